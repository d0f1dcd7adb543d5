// Training-mode batch normalization fused with an optional residual add and ReLU, for CPU tensors
// whose channels are the innermost dimension (channels_last 4-D tensors, or 2-D [rows, channels]).
//
//   forward:  v = weight * (x - mean) * invstd + bias [+ residual];  y = relu(v)
//   backward: g = dy where v > 0 (or v is NaN) else 0; the batch-norm gradient of g; d(residual) = g
//
// The forward pass keeps which elements passed the ReLU as a mask (one bit per element on the
// AVX-512 and AVX2 paths, one byte otherwise), so the backward pass reads that instead of y. NaN
// passes the ReLU, as in torch.relu, so a diverging run stays visibly non-finite.
//
// Each tensor is read as a [M, C] matrix (M = N*H*W rows). Per-channel sums are taken over a fixed
// number of row chunks and combined in double precision in chunk order, so results do not depend
// on the thread count. Arithmetic is float32 for float32 and bfloat16 tensors alike.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: a quarter of the first build
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunks = 64;  // row chunks of the per-channel reductions

// bfloat16 <-> float by bit manipulation (round to nearest even, NaN kept), the same on every CPU
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t float_to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One float lane: the portable path, for any channel count.
struct Lane1 {
  static constexpr int64_t W = 1;
  using V = float;
  static V zero() { return 0.f; }
  static V load(const float* p) { return *p; }
  static V load(const at::BFloat16* p) { return bf16_to_float(reinterpret_cast<const uint16_t&>(*p)); }
  static void store(float* p, V v) { *p = v; }
  static void store(at::BFloat16* p, V v) { reinterpret_cast<uint16_t&>(*p) = float_to_bf16(v); }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  using Mask = uint8_t;  // one byte per element
  static Mask passes(V v) { return !(v <= 0.f); }  // v > 0 or NaN
  static V keep(Mask m, V g) { return m ? g : 0.f; }
};

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// Eight float lanes (AVX2 with FMA), for channel counts that are multiples of 8 on CPUs without
// AVX-512 (and for those that are not multiples of 16 on CPUs with it). Each lane is one channel
// and does the same arithmetic as a lane of Lane16, so the two give the same bits.
struct Lane8 {
  static constexpr int64_t W = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(at::BFloat16* p, V v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 32 -> 16 bits: packus works within 128-bit halves; the permute puts the halves together
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  using Mask = uint8_t;  // one bit per element
  static Mask passes(V v) {
    const V positive_or_nan = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ);
    return static_cast<Mask>(_mm256_movemask_ps(positive_or_nan));
  }
  static V keep(Mask m, V g) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), bits), bits);
    return _mm256_and_ps(_mm256_castsi256_ps(on), g);
  }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Sixteen float lanes (AVX-512), for channel counts that are multiples of 16.
struct Lane16 {
  static constexpr int64_t W = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(at::BFloat16* p, V v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  using Mask = uint16_t;  // one bit per element
  static Mask passes(V v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ); }
  static V keep(Mask m, V g) { return _mm512_maskz_mov_ps(m, g); }
};
#endif

struct Rows {
  int64_t m, c;
};

Rows rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "bn_act: CPU tensors only");
  if (x.dim() == 4) {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "bn_act: 4-D tensors must be channels_last contiguous");
    return {x.size(0) * x.size(2) * x.size(3), x.size(1)};
  }
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bn_act: expected a 4-D or contiguous 2-D tensor");
  return {x.size(0), x.size(1)};
}

// Per-channel sums over all rows of u and u * v, where F(i, j) -> (u, v) for the element at flat
// index i in channel j; partial sums per chunk in float, combined in double in chunk order.
template <typename L, typename F>
void channel_sums(int64_t m, int64_t c, F f, std::vector<double>& out1, std::vector<double>& out2) {
  using V = typename L::V;
  const int64_t n = std::min(kChunks, std::max<int64_t>(m, 1));
  std::vector<float> p1(n * c), p2(n * c);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * m / n, r1 = (i + 1) * m / n;
      for (int64_t j = 0; j < c; j += L::W) {
        V a1 = L::zero(), a2 = L::zero(), b1 = L::zero(), b2 = L::zero();
        int64_t r = r0;
        for (; r + 1 < r1; r += 2) {
          auto [u, v] = f(r * c + j, j);
          a1 = L::add(a1, u);
          a2 = L::fma(u, v, a2);
          auto [u2, v2] = f((r + 1) * c + j, j);
          b1 = L::add(b1, u2);
          b2 = L::fma(u2, v2, b2);
        }
        if (r < r1) {
          auto [u, v] = f(r * c + j, j);
          a1 = L::add(a1, u);
          a2 = L::fma(u, v, a2);
        }
        L::store(&p1[i * c + j], L::add(a1, b1));
        L::store(&p2[i * c + j], L::add(a2, b2));
      }
    }
  });
  out1.assign(c, 0.0);
  out2.assign(c, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      out1[j] += p1[i * c + j];
      out2[j] += p2[i * c + j];
    }
  }
}

template <typename L, typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor* residual, at::Tensor& y, at::Tensor* mask,
                  at::Tensor& mean_t, at::Tensor& invstd_t, at::Tensor& running_mean,
                  at::Tensor& running_var, double momentum, double eps) {
  using V = typename L::V;
  const auto [m, c] = rows_of(x);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  auto* mkp = mask ? reinterpret_cast<typename L::Mask*>(mask->data_ptr()) : nullptr;
  // shift by the first row so that the sums of squares do not cancel when |mean| >> std
  std::vector<float> shift(c);
  for (int64_t j = 0; j < c; ++j) shift[j] = Lane1::load(xp + j);
  const float* sh = shift.data();
  std::vector<double> s1, s2;
  channel_sums<L>(
      m, c,
      [=](int64_t i, int64_t j) {
        V d = L::sub(L::load(xp + i), L::load(sh + j));
        return std::pair<V, V>(d, d);
      },
      s1, s2);
  float* mp = mean_t.data_ptr<float>();
  float* ip = invstd_t.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  std::vector<float> scale(c), offset(c);
  std::vector<double> var_unbiased(c);
  for (int64_t j = 0; j < c; ++j) {
    double d = s1[j] / m;
    double var = std::max(s2[j] / m - d * d, 0.0);
    double mean = sh[j] + d;
    double inv = 1.0 / std::sqrt(var + eps);
    mp[j] = float(mean);
    ip[j] = float(inv);
    var_unbiased[j] = m > 1 ? var * m / (m - 1) : var;
    scale[j] = float(wp[j] * inv);
    offset[j] = float(bp[j] - mean * wp[j] * inv);
  }
  if (running_mean.numel() > 0) {
    float* rmp = running_mean.data_ptr<float>();
    float* rvp = running_var.data_ptr<float>();
    for (int64_t j = 0; j < c; ++j) {
      rmp[j] = float((1.0 - momentum) * rmp[j] + momentum * double(mp[j]));
      rvp[j] = float((1.0 - momentum) * rvp[j] + momentum * var_unbiased[j]);
    }
  }
  const float* sc = scale.data();
  const float* of = offset.data();
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < c; j += L::W) {
        const int64_t i = r * c + j;
        V v = L::fma(L::load(xp + i), L::load(sc + j), L::load(of + j));
        if (rp) v = L::add(v, L::load(rp + i));
        if (mkp) {
          const auto k = L::passes(v);
          mkp[i / L::W] = k;
          v = L::keep(k, v);
        }
        L::store(yp + i, v);
      }
    }
  });
}

template <typename L, typename T>
void backward_impl(const at::Tensor& gy, const at::Tensor* mask, const at::Tensor& x,
                   const at::Tensor& mean_t, const at::Tensor& invstd_t, const at::Tensor& weight,
                   at::Tensor& gx, at::Tensor& gw, at::Tensor& gb, at::Tensor* gr) {
  using V = typename L::V;
  const auto [m, c] = rows_of(x);
  const T* gyp = gy.data_ptr<T>();
  const auto* mkp = mask ? reinterpret_cast<const typename L::Mask*>(mask->data_ptr()) : nullptr;
  const T* xp = x.data_ptr<T>();
  const float* mp = mean_t.data_ptr<float>();
  const float* ip = invstd_t.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  std::vector<double> sg, sgx;
  channel_sums<L>(
      m, c,
      [=](int64_t i, int64_t j) {
        V g = L::load(gyp + i);
        if (mkp) g = L::keep(mkp[i / L::W], g);
        return std::pair<V, V>(g, L::sub(L::load(xp + i), L::load(mp + j)));
      },
      sg, sgx);
  float* gwp = gw.data_ptr<float>();
  float* gbp = gb.data_ptr<float>();
  std::vector<float> k1(c), k2(c), k3(c);
  for (int64_t j = 0; j < c; ++j) {
    const double inv = ip[j];
    gwp[j] = float(sgx[j] * inv);
    gbp[j] = float(sg[j]);
    // gx = w*inv * (g - sum(g)/m - (x - mean) * inv^2 * sum(g*(x - mean))/m) = g*a + x*b + d
    const double a = double(wp[j]) * inv;
    const double b = -a * inv * inv * sgx[j] / m;
    k1[j] = float(a);
    k2[j] = float(b);
    k3[j] = float(-a * sg[j] / m - b * mp[j]);
  }
  T* gxp = gx.data_ptr<T>();
  T* grp = gr ? gr->data_ptr<T>() : nullptr;
  const float *a = k1.data(), *b = k2.data(), *d = k3.data();
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < c; j += L::W) {
        const int64_t i = r * c + j;
        V g = L::load(gyp + i);
        if (mkp) g = L::keep(mkp[i / L::W], g);
        L::store(gxp + i, L::fma(g, L::load(a + j),
                                 L::fma(L::load(xp + i), L::load(b + j), L::load(d + j))));
        if (grp) L::store(grp + i, g);
      }
    }
  });
}

// Calls fn with the widest lane type the CPU build and the channel count allow.
template <typename Fn>
void with_lanes(int64_t c, Fn fn) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (c % Lane16::W == 0) return fn(Lane16{});
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (c % Lane8::W == 0) return fn(Lane8{});
#endif
  fn(Lane1{});
}

void same_layout(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), "bn_act: ", name,
              " must match the input's shape and dtype");
  rows_of(t);  // and be laid out the same way (channels innermost, contiguous)
}

void check_params(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == x.size(1),
              "bn_act: ", name, " must be a contiguous float32 vector of ", x.size(1), " values");
}

// The mask's element type and count for x on the path with_lanes picks.
at::Tensor empty_mask(const at::Tensor& x) {
  at::Tensor mask;
  with_lanes(x.size(1), [&](auto lanes) {
    using L = decltype(lanes);
    const int64_t n = x.numel() / L::W;
    const auto dtype = sizeof(typename L::Mask) == 1 ? at::kByte : at::kShort;
    mask = at::empty({n}, x.options().dtype(dtype));
  });
  return mask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, at::Tensor running_mean, at::Tensor running_var,
    double momentum, double eps, bool relu) {
  rows_of(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bn_act: float32 or bfloat16 only");
  check_params(x, weight, "weight");
  check_params(x, bias, "bias");
  if (running_mean.numel() > 0) {
    check_params(x, running_mean, "running_mean");
    check_params(x, running_var, "running_var");
  }
  if (residual) same_layout(x, *residual, "residual");
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = relu ? empty_mask(x) : at::empty({0}, x.options().dtype(at::kByte));
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor invstd = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  const at::Tensor* r = residual ? &*residual : nullptr;
  at::Tensor* mk = relu ? &mask : nullptr;
  with_lanes(x.size(1), [&](auto lanes) {
    using L = decltype(lanes);
    if (x.scalar_type() == at::kFloat) {
      forward_impl<L, float>(x, weight, bias, r, y, mk, mean, invstd, running_mean, running_var,
                             momentum, eps);
    } else {
      forward_impl<L, at::BFloat16>(x, weight, bias, r, y, mk, mean, invstd, running_mean,
                                    running_var, momentum, eps);
    }
  });
  return {y, mask, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& gy, const at::Tensor& mask, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool residual) {
  rows_of(x);
  same_layout(x, gy, "grad");
  check_params(x, weight, "weight");
  check_params(x, mean, "mean");
  check_params(x, invstd, "invstd");
  const bool relu = mask.numel() > 0;
  if (relu) {
    TORCH_CHECK(mask.sizes() == empty_mask(x).sizes() && mask.is_contiguous(),
                "bn_act: mask does not come from bn_act_forward on this input");
  }
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = at::empty_like(weight);
  at::Tensor gr = residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor* grp = residual ? &gr : nullptr;
  const at::Tensor* mk = relu ? &mask : nullptr;
  with_lanes(x.size(1), [&](auto lanes) {
    using L = decltype(lanes);
    if (x.scalar_type() == at::kFloat) {
      backward_impl<L, float>(gy, mk, x, mean, invstd, weight, gx, gw, gb, grp);
    } else {
      backward_impl<L, at::BFloat16>(gy, mk, x, mean, invstd, weight, gx, gw, gb, grp);
    }
  });
  return {gx, gw, gb, gr};
}

}  // namespace

TORCH_LIBRARY(bnlab_cpu, m) {
  m.def("bn_act_forward(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
        "Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_act_backward(Tensor grad, Tensor mask, Tensor x, Tensor mean, Tensor invstd, "
        "Tensor weight, bool residual) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlab_cpu, CPU, m) {
  m.impl("bn_act_forward", bn_act_forward);
  m.impl("bn_act_backward", bn_act_backward);
}
