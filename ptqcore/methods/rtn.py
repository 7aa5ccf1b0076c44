"""RTN: round-to-nearest, the baseline every PTQ method is measured against.

Each linear of each block is rounded on its own min-max grid (GPTQ reference `Quantizer`
semantics: asymmetric, zero forced into the range), per channel or per group; no data.
"""

from __future__ import annotations

import torch

from ..calib import BlockContext
from ..quant import check_group_size, quantize_weight
from .base import Method, MethodInfo


class RTN(Method):
    info = MethodInfo(
        "rtn", "baseline", "round-to-nearest (no calibration)", "quantizer", needs_calibration=False, accepts_basis=True
    )

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> dict:
        state = {}
        for name, linear in ctx.adapter.linears(ctx.block).items():
            check_group_size(linear.in_features, self.config.spec, f"{name} of block {ctx.index}")
            W, _, undo = ctx.to_basis(linear.weight.data.float(), None, name)
            qw = quantize_weight(W, self.config.spec)
            linear.weight.data = ctx.from_basis(qw.dequantize(), undo).to(linear.weight.dtype)
            state[name] = {"scale": qw.scale, "zero": qw.zero, "g_idx": qw.g_idx, **({"basis": True} if ctx.basis else {})}
        return state
