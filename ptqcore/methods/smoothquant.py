"""SmoothQuant (transformation): Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
Quantization for LLMs", ICML 2023; reference code mit-han-lab/smoothquant (`smooth.py`,
`calibration.py`).

Migrates activation outliers into the weights with a per-channel scale, for the groups of
linears that read the residual stream through a norm (q/k/v after `input_layernorm`,
gate/up after `post_attention_layernorm`):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),  clamped to >= 1e-5,

`max|X_j|` over every calibration token of the group's input, `max|W_j|` over the rows of all
the group's linears (clamped to >= 1e-5 as the reference's `weight_scales`), then
`norm.weight /= s` and each linear's input columns `*= s`
(`ptqcore.transforms.smooth.scale_norm_linears`). Default alpha 0.5. The quantizer that
follows (RTN by default, `smoothquant+gptq`) rounds the smoothed weights, and `ActSpec`
activation fake-quantization (`w8a8`) sees the smoothed inputs.

Deviations from the reference, each in one line:
- Only the norm groups are smoothed, as the reference (ln -> qkv and ln -> fc1); the groups
  after a linear (v -> o, up -> down) are left alone and listed as skipped in the state.
- Activation maxima come from `ctx.inputs`, i.e. inside the one block loop, on the inputs that
  block i receives from the already smoothed and quantized blocks before it; the reference
  measures them in one pass over the full-precision model. The loop offers no full-precision
  stream (`prepare` gets no data), and these are the activations the quantized model will
  actually feed the smoothed linears, so the scale balances what the quantizers will see.
- Everything in float32 (the fold in float64); the reference casts the scales to the model dtype.
- Mixtures of experts: one scale per norm, `max|X_j|` over every token entering the MoE block
  (the group's `input_at`), `max|W_j|` over every expert's gate/up; the router and shared-expert
  gate (`group.readers`) get the same column scaling and stay in full precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calib import BlockContext
from ..models.adapters import Adapter
from ..transforms.smooth import fold_scale
from .base import Method, MethodConfig, MethodInfo


def smooth_scales(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """The reference's `smooth_ln_fcs` scales from per-channel max|X| and the group's weights."""
    weight_max = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def apply_smoothquant_block(block: nn.Module, adapter: Adapter, state: dict) -> None:
    """Replay one block's SmoothQuant state (as returned by `SmoothQuant.process_block`)."""
    for group in adapter.groups:
        if group.name in state["scales"]:
            fold_scale(block, group, state["scales"][group.name]["scales"])


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}")


class SmoothQuant(Method):
    info = MethodInfo(
        "smoothquant", "transformation", "Xiao et al., SmoothQuant, ICML 2023", "transform",
        needs_calibration=True, default_quantizer="rtn",
    )
    Config = SmoothQuantConfig

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> dict:
        if ctx.inputs is None:
            raise ValueError("SmoothQuant needs calibration inputs")
        norm_groups = {group.name for group in ctx.adapter.norm_groups()}
        state: dict = {"scales": {}, "skipped": {}}
        for group in ctx.adapter.groups:
            if group.name not in norm_groups:
                state["skipped"][group.name] = f"follows {group.prev}, not a norm (the reference smooths only those)"
                continue
            act_max = torch.zeros(ctx.linear(group.linears[0]).in_features, device=ctx.inputs.device)

            def running_max(x: torch.Tensor, _acc=act_max) -> None:
                torch.maximum(_acc, x.detach().abs().reshape(-1, x.shape[-1]).float().amax(0), out=_acc)

            ctx.feed_inputs(group, running_max)
            weights = [ctx.linear(name).weight for name in group.linears]
            s = smooth_scales(act_max, weights, self.config.alpha)
            fold_scale(ctx.block, group, s)
            state["scales"][group.name] = {"prev": group.prev, "linears": list(group.linears), "scales": s,
                                           "act_max": act_max.clone()}
        return state
