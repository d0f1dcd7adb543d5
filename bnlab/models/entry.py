"""The user's own network in a run: model = "entry:MODULE:FUNCTION" (docs/models.md).

FUNCTION is called as `FUNCTION(num_classes=..., norm=...)`, and with `in_channels=` and
`image_size=` too where it names them. `norm` is a NormFactory, the run's norm and norm_options
as torchvision models take a `norm_layer`: `norm(channels)` returns a new layer over `channels`
channels of (N, C, H, W) inputs, `norm(channels, dim=1)` one for (N, C) features. The function
builds every norm layer it wants compared through it, so that the BN and the no-BN arm of a
study are the same network but for its norms, and initializes its own weights (bnlab's `init`
is not applied: bnlab.usercode.NOT_FOR_ENTRIES).

Checked here, each a one-line UserError: the module and function exist, the function takes
num_classes and norm, it returns an nn.Module, a norm other than none built at least one layer
that the model holds, the model holds no BatchNorm the factory did not make (it would
normalize in the no-BN arm too), and its source file is still the one the run's id was made
with. build_for also runs two images of the run's data through it (bnlab.models.build).
"""

from __future__ import annotations

import inspect

from torch import nn

from bnlab.errors import UserError
from bnlab.norm import has_bias_substitute, make_norm
from bnlab.usercode import (
    first_line,
    load_function,
    script_folder,
    source_file,
    source_hash,
    split_model_entry,
    user_failure,
)

GIVEN = ("num_classes", "norm")  # what every entry function receives
OPTIONAL = ("in_channels", "image_size")  # what it receives where it names them


class NormFactory:
    """`norm(channels, dim=2)`: a new layer of the run's norm (`norm.name`, `norm.options`)
    over `channels` channels; dim=2 for (N, C, H, W) inputs, dim=1 for (N, C) features.
    `norm.conv_bias` says whether the conv or linear layer before it should carry a bias (True
    for none and frozen, whose output has no learned shift; bnlab.norm.has_bias_substitute)."""

    def __init__(self, name: str = "bn", options: dict | None = None):
        self.name, self.options = name, dict(options or {})
        self.conv_bias = has_bias_substitute(name, self.options)
        self.made: list[nn.Module] = []

    def __call__(self, channels: int, dim: int = 2) -> nn.Module:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise UserError(f"norm(channels) needs a number of channels >= 1, got {channels!r}")
        if dim not in (1, 2):
            raise UserError(f"norm(channels, dim) takes dim 2 for (N, C, H, W) inputs or 1 for "
                            f"(N, C) features, got {dim!r}")
        layer = make_norm(self.name, channels, dim=dim, **self.options)
        self.made.append(layer)
        return layer

    def __repr__(self) -> str:
        return f"NormFactory({self.name!r}, {self.options!r})"


def _arguments(fn, label: str, name: str, values: dict) -> dict:
    """The keyword arguments of `values` that `fn` takes; refuse a function that does not take
    num_classes and norm, or that requires an argument bnlab cannot give."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with the two
        return {k: values[k] for k in GIVEN}
    open_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [k for k in GIVEN if k not in named and not open_kw]
    required = [k for k, p in params.items() if p.default is p.empty and k not in values
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing or required:
        why = (f"does not take {', '.join(missing)}" if missing
               else f"requires {', '.join(required)}, which bnlab does not give")
        raise UserError(f"{label}: {name}{inspect.signature(fn)} {why}; an entry function is "
                        f"called as {name}(num_classes=..., norm=...) (with in_channels= and "
                        "image_size= where it names them) and returns an nn.Module")
    return {k: v for k, v in values.items() if k in GIVEN or k in named}


def _check_norms(model: nn.Module, factory: NormFactory, label: str) -> None:
    held = {id(m) for m in model.modules()}
    made = {id(m) for m in factory.made}
    if factory.name != "none" and not made & held:
        why = ("never called norm(channels)" if not factory.made else
               f"called norm(channels) {len(factory.made)} time(s) but holds none of the layers "
               "it returned")
        raise UserError(f"{label}: the model built no norm layer although norm="
                        f"{factory.name!r} (its function {why}): build each norm layer to "
                        "compare with norm(channels)")
    for where, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in made:
            raise UserError(f"{label}: the model holds {type(m).__name__} {where!r}, which its "
                            f"norm factory did not make, so it would normalize with batch "
                            f"statistics under norm={factory.name!r} too: build it with "
                            "norm(channels)")


def check_entry(model: str) -> None:
    """What can be checked before a study trains anything: the module imports, and has a
    function of that name that takes num_classes and norm."""
    label = f"model {model!r}"
    module, name = split_model_entry(model)
    with script_folder(module):
        fn = load_function(module, name, label)
        _arguments(fn, label, name, {"num_classes": 0, "norm": None, "in_channels": 0,
                                     "image_size": 0})


def build_entry_model(model: str, num_classes: int, norm: str = "bn",
                      norm_options: dict | None = None, in_channels: int = 3,
                      image_size: int = 32, expect_source: str = "") -> nn.Module:
    """Call the function of `model` ("entry:MODULE:FUNCTION") and check what it built (see the
    module docstring); `expect_source`, a run config's model_source, must match the file."""
    label = f"model {model!r}"
    module, name = split_model_entry(model)
    if expect_source:
        now = source_hash(source_file(module, label))
        if now != expect_source:
            raise UserError(f"{label}: its source file changed since the run's config was made "
                            f"(hash {expect_source}, now {now}); the run id names the code it "
                            "was made with: restore the file, or plan the runs again (new ids)")
    factory = NormFactory(norm, norm_options)
    values = {"num_classes": num_classes, "norm": factory, "in_channels": in_channels,
              "image_size": image_size}
    with script_folder(module):
        fn = load_function(module, name, label)
        kwargs = _arguments(fn, label, name, values)
        try:
            net = fn(**kwargs)
        except UserError:  # the norm factory's own refusal (an option, a dimension)
            raise
        except BaseException as e:  # anything the user's function raises, exit included
            if not user_failure(e):
                raise
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise UserError(f"{label}: calling {name}({shown}) raised {first_line(e)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{label}: {name}() returned a {type(net).__name__}, not a "
                        "torch.nn.Module")
    _check_norms(net, factory, label)
    return net
