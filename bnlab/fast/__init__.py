"""The fast path of a training step; none of it changes what a step computes.

accel.py        memory layout, torch.compile, the CPU allocator, the non-stalling divergence check
step_graph.py   a whole training step captured once and replayed as one CUDA graph
cpu_kernels.py  fused C++ kernels (BatchNorm + residual add + ReLU, batch making) for the CPU
csrc/           their sources, built on first use
"""
