"""Per-channel scales folded into the op before a group of linears (the llm-awq helpers).

For a group of linears reading `h = prev(...)`, a positive scale `s` per input channel gives
the same outputs when `prev`'s output is divided by `s` and each linear's input columns are
multiplied by `s`: `W (h / s * s) = W h`. The op before can be

- a norm (`norm.weight /= s`, and its bias if it has one): `scale_norm_linears`;
- a linear whose outputs are the group's input channels (`prev` rows and bias `/= s`):
  `scale_linear_linear`, e.g. v_proj -> o_proj (attention is linear in the values, channel by
  channel) or up_proj -> down_proj (the gate multiplies up's output element-wise); with
  `group.prev_rows` only that slice of prev's rows (Mamba: x_proj's dt rows -> dt_proj).

`fold_scale` dispatches on what `group.prev` is (an `nn.Linear` or not), never on model
classes. Scales are applied in float64 and written back in the parameters' dtype. The group's
`readers` (an MoE router, a shared-expert gate) read the same input and get the same column
scaling as its linears, so the fold stays exact (they stay in full precision).

A linear-to-linear fold needs `prev.out_features == in_features` of the group: with grouped
query attention (SmolLM2: v_proj 192 outputs, o_proj 576 inputs) no per-channel scale on
o_proj's inputs folds into v_proj, and `fold_skip_reason` says so (llm-awq scales v -> o only
when the two weights have the same shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.adapters import LinearGroup


def _check_scales(s: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    s = s.detach().reshape(-1)
    if s.numel() != channels:
        raise ValueError(f"{what}: {s.numel()} scales for {channels} channels")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{what}: scales must be finite and positive")
    return s.double()


def _check_linears(linears: Sequence[nn.Linear], channels: int) -> None:
    for linear in linears:
        if linear.in_features != channels:
            raise ValueError(f"a linear with {linear.in_features} inputs cannot take {channels} scales")


def _mul_columns(linears: Sequence[nn.Linear], s64: torch.Tensor) -> None:
    for linear in linears:
        w = linear.weight.data
        linear.weight.data = (w.double() * s64.to(w.device)[None, :]).to(w.dtype)


@torch.no_grad()
def scale_norm_linears(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """`norm.weight /= s` (and `norm.bias`), each linear's input columns `*= s`. In place."""
    s64 = _check_scales(s, norm.weight.numel(), "scale_norm_linears")
    _check_linears(linears, s64.numel())
    w = norm.weight.data
    norm.weight.data = (w.double() / s64.to(w.device)).to(w.dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.data.double() / s64.to(bias.device)).to(bias.dtype)
    _mul_columns(linears, s64)


@torch.no_grad()
def scale_linear_linear(prev: nn.Linear, linears: Sequence[nn.Linear], s: torch.Tensor,
                        rows: tuple[int, int] | None = None) -> None:
    """`prev`'s output rows (and bias) `/= s`, each linear's input columns `*= s`. In place.
    `rows` = (start, end): only those output rows of `prev` feed the linears and are scaled."""
    start, end = rows or (0, prev.out_features)
    s64 = _check_scales(s, end - start, "scale_linear_linear")
    _check_linears(linears, s64.numel())
    w = prev.weight.data
    scaled = w.double()
    scaled[start:end] /= s64.to(w.device)[:, None]
    prev.weight.data = scaled.to(w.dtype)
    if prev.bias is not None:
        bias = prev.bias.data.double()
        bias[start:end] /= s64.to(bias.device)
        prev.bias.data = bias.to(prev.bias.dtype)
    _mul_columns(linears, s64)


def fold_skip_reason(block: nn.Module, group: LinearGroup) -> str | None:
    """Why no per-input-channel scale can be folded in front of `group` (None: it can)."""
    if group.prev is None:
        return "the group has no preceding op to fold a scale into"
    prev = block.get_submodule(group.prev)
    linears = [block.get_submodule(name) for name in group.fold_targets]
    if isinstance(prev, nn.Linear):
        start, end = group.prev_rows or (0, prev.out_features)
        if any(linear.in_features != end - start for linear in linears) or not 0 <= start < end <= prev.out_features:
            shapes = ", ".join(f"{n} {tuple(m.weight.shape)}" for n, m in zip(group.fold_targets, linears))
            rows = f" (rows {start}:{end})" if group.prev_rows else ""
            return (f"{group.prev} {tuple(prev.weight.shape)}{rows} has {end - start} outputs but {shapes} "
                    f"read {linears[0].in_features} inputs (e.g. grouped-query attention): no scale folds into it")
        return None
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != linears[0].in_features:
        return f"{group.prev} ({type(prev).__name__}) has no per-channel weight to fold a scale into"
    return None


def fold_scale(block: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """Fold `s` (one per input channel of `group`) into `group.prev`: a linear or a norm."""
    reason = fold_skip_reason(block, group)
    if reason is not None:
        raise ValueError(f"cannot fold a scale in front of {group.name}: {reason}")
    prev = block.get_submodule(group.prev)
    linears = [block.get_submodule(name) for name in group.fold_targets]
    if isinstance(prev, nn.Linear):
        scale_linear_linear(prev, linears, s, group.prev_rows)
    else:
        scale_norm_linears(prev, linears, s)
