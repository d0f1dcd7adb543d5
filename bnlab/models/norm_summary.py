"""What a norm swap resolved to: the norm layers a model holds, with the options that differ
between them written into their label ("GroupNorm(8)": 8 groups), counted.

A norm option can resolve per layer: `groups` becomes gcd(requested, channels) so that it
divides the layer's channels (bnlab.norm.factory), so 64 channels asked for 5 groups get 1. The
summary makes that visible: `bnlab train` logs it once and config.json keeps it
(`model.norm_layers`).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from bnlab.norm import OPTIONS, is_norm_layer


def layer_label(m: nn.Module) -> str:
    """A norm layer's class, with its group count for a GroupNorm: 'GroupNorm(8)'."""
    name = type(m).__name__
    if isinstance(m, nn.GroupNorm):
        return f"{name}({m.num_groups})"
    return name


def norm_layers(model: nn.Module) -> dict[str, int]:
    """label -> how many layers of `model` carry it, most common first."""
    counts = Counter(layer_label(m) for m in model.modules() if is_norm_layer(m))
    return dict(counts.most_common())


def group_rule(norm: str, options: dict, model: nn.Module) -> str:
    """'' when every GroupNorm has the group count asked for; else the rule that changed it."""
    if norm != "group":
        return ""
    asked = options.get("groups", OPTIONS["group"]["groups"])
    got = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    if got <= {asked}:
        return ""
    return (f"groups {asked} asked; a layer gets gcd({asked}, its channels) groups, the "
            "largest count that divides its channels and the asked one")


def swap_line(arch: str, before: dict[str, int], model: nn.Module, norm: str,
              options: dict) -> str:
    """One line: 'torchvision:resnet18: 20 BatchNorm2d -> GroupNorm(8) x 20'."""
    old = ", ".join(f"{n} {name}" for name, n in before.items()) or "no BatchNorm"
    new = ", ".join(f"{label} x {n}" for label, n in norm_layers(model).items())
    if not new:
        new = "nn.Identity (no norm)" if norm == "none" else "nothing"
    rule = group_rule(norm, options, model)
    return f"{arch}: {old} -> {new}" + (f" ({rule})" if rule else "")


def norm_note(model: nn.Module, norm: str, options: dict) -> str:
    """The line a run logs about its norm layers: a torchvision model's swap, or the group
    rule where it changed a group count; '' when there is nothing to say."""
    swap = getattr(model, "swap_summary", "")
    if swap:
        return swap
    rule = group_rule(norm, options, model)
    if not rule:
        return ""
    layers = ", ".join(f"{label} x {n}" for label, n in norm_layers(model).items())
    return f"norm {norm}: {layers} ({rule})"
