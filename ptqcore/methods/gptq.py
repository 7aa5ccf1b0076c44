"""GPTQ (compensation): Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023; reference code IST-DASLab/gptq.

Faithful to the reference `GPTQ.fasterquant` and `add_batch`:
- Hessian `H = 2/N sum X X^T` accumulated as a running average in float32 (N counts windows);
- dead columns (zero diagonal) get `H_ii = 1` and a zero weight column;
- damping `percdamp * mean(diag H)` (0.01), then `Hinv` = the upper Cholesky factor of `H^-1`;
- columns quantized one at a time, the error `(w - q) / Hinv_ii` pushed onto the columns not
  yet quantized, lazily in blocks of `blocksize` (128);
- act-order (columns by decreasing `H_ii`), group parameters taken at each group boundary as
  the loop reaches it (so with act-order groups follow the permuted order), or `static_groups`
  (all group parameters from the original weight before any update);
- true-sequential: within a block, the groups of linears are quantized in order and each
  group's Hessian is collected with the groups before it already quantized.

Defaults: blocksize 128, percdamp 0.01, and act-order + true-sequential on (the reference's
flags are off by default; its best published numbers and our reference figures use both).

Deviation, one line: linears that read the same input (q/k/v; gate/up) share one Hessian and
GPTQ treats rows independently, so their rows are stacked and quantized in one call — the
result is identical to quantizing them one by one, at a third of the Cholesky/loop work.

Mixtures of experts: each expert's linears (a part of the adapter group) get the Hessian of
the tokens routed to that expert only; an expert routed fewer than the loop's
`min_expert_tokens` gets RTN on the same grid instead (recorded by `BlockContext.fallback`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..calib import BlockContext
from ..quant import QuantSpec, check_group_size, find_params, quantize, quantize_weight
from .base import Method, MethodConfig, MethodInfo


class HessianAccumulator:
    """`H = 2/N sum_n X_n^T X_n` over windows, as the reference's running average."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())


def stage_hessians(ctx: BlockContext, groups: list) -> list[list[tuple[torch.Tensor, int]]]:
    """Per group of `groups` (inputs none of them changes: a stage), per token set: the Hessian
    of its inputs and the tokens it saw, from one pass (`BlockContext.feed_stage`)."""
    accs = [[HessianAccumulator(ctx.linear(names[0]).in_features, ctx.inputs.device) for names in g.token_sets()]
            for g in groups]
    counts = ctx.feed_stage(groups, lambda gi, si, x: accs[gi][si].add_batch(x))
    return [[(acc.H, n) for acc, n in zip(a, c)] for a, c in zip(accs, counts)]


@dataclass
class GPTQResult:
    weight: torch.Tensor  # fake-quantized weight, original column order
    scale: torch.Tensor  # [rows, groups], in the order groups were formed
    zero: torch.Tensor
    g_idx: torch.Tensor  # group of each input column
    perm: torch.Tensor | None  # act-order permutation
    loss: float  # sum over rows of the reference's per-column losses


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """GPTQ on a bare weight `W` [rows, cols] with Hessian `H` [cols, cols] (not modified)."""
    W = W.clone().float()
    rows, columns = W.shape
    check_group_size(columns, spec)
    groupsize = spec.group_size
    maxq = spec.maxq
    scale, zero = find_params(W, spec)  # per-channel parameters (used when there are no groups)
    H = H.clone().float()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = []
    if groupsize and static_groups:
        groups = [find_params(W[:, i : i + groupsize], spec) for i in range(0, columns, groupsize)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    try:
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
    except torch.linalg.LinAlgError as err:
        raise RuntimeError(f"GPTQ: the damped Hessian is not positive definite ({err}); raise percdamp") from None

    formed_scales, formed_zeros = [], []
    if not groupsize:
        formed_scales, formed_zeros = [scale], [zero]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        # The block is held transposed ([count, rows]) so each column is a contiguous vector.
        W1 = W[:, i1:i2].t().contiguous()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[i]
            d = Hinv1[i, i]
            if groupsize:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        # Reference semantics: parameters from the outer W, i.e. with the
                        # lazy updates of earlier blocks but not those inside this block.
                        scale, zero = find_params(W[:, i1 + i : i1 + i + groupsize], spec)
                        formed_scales.append(scale)
                        formed_zeros.append(zero)
                else:
                    idx = i1 + i
                    if act_order:
                        idx = perm[idx].item()
                    scale, zero = groups[idx // groupsize]
            q = Q1[i]
            torch.div(w, scale[:, 0], out=q)
            q.round_().add_(zero[:, 0]).clamp_(0, maxq).sub_(zero[:, 0]).mul_(scale[:, 0])
            err1 = Err1[i]
            torch.sub(w, q, out=err1).div_(d)
            W1[i:].addr_(Hinv1[i, i:], err1, alpha=-1)
        Q[:, i1:i2] = Q1.t()
        losses[:, i1:i2] = Err1.t() ** 2 / 2  # (w - q)^2 / d^2 / 2, as the reference's Losses1 / 2
        W[:, i2:] -= Err1.t().matmul(Hinv[i1:i2, i2:])

    if act_order:
        Q = Q[:, invperm]
    if groupsize and static_groups:
        formed_scales = [s for s, _ in groups]
        formed_zeros = [z for _, z in groups]
        g_idx = torch.arange(columns, device=W.device) // groupsize
    elif groupsize:
        position = torch.arange(columns, device=W.device) // groupsize  # group of the j-th quantized column
        g_idx = torch.empty_like(position)
        g_idx[perm if act_order else slice(None)] = position
    else:
        g_idx = torch.zeros(columns, dtype=torch.long, device=W.device)
    return GPTQResult(
        weight=Q,
        scale=torch.cat(formed_scales, 1),
        zero=torch.cat(formed_zeros, 1),
        g_idx=g_idx,
        perm=perm,
        loss=float(losses.sum()),
    )


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if self.blocksize <= 0:
            raise ValueError(f"GPTQ blocksize must be positive, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"GPTQ percdamp must be in (0, 1), got {self.percdamp}")


class GPTQ(Method):
    info = MethodInfo(
        "gptq", "compensation", "Frantar et al., GPTQ, ICLR 2023", "quantizer", needs_calibration=True,
        accepts_basis=True,
    )
    Config = GPTQConfig

    def _gptq(self, ctx: BlockContext, names: tuple[str, ...], W: torch.Tensor, H: torch.Tensor) -> GPTQResult:
        cfg = self.config
        try:
            return gptq_quantize(W, H, cfg.spec, cfg.blocksize, cfg.percdamp, cfg.act_order, cfg.static_groups)
        except RuntimeError as err:
            raise RuntimeError(f"block {ctx.index}, layers {', '.join(names)}: {err}") from None

    def _quantize_part(self, ctx: BlockContext, names: tuple[str, ...], H: torch.Tensor | None) -> tuple[dict, float]:
        """Quantize linears that share one Hessian (stacked rows); `H` None: RTN (expert fallback)."""
        cfg = self.config
        linears = [ctx.linear(name) for name in names]
        for name, linear in zip(names, linears):
            check_group_size(linear.in_features, cfg.spec, f"{name} of block {ctx.index}")
        state = {}
        if H is None:
            for name, linear in zip(names, linears):
                W, _, undo = ctx.to_basis(linear.weight.data.float(), None, name)
                qw = quantize_weight(W, cfg.spec)
                linear.weight.data = ctx.from_basis(qw.dequantize(), undo).to(linear.weight.dtype).contiguous()
                state[name] = {"scale": qw.scale, "zero": qw.zero, "g_idx": qw.g_idx, "fallback": "rtn"}
            return state, 0.0
        if ctx.basis:  # a change of basis is per layer: quantize each linear on its own
            loss = 0.0
            for name, linear in zip(names, linears):
                W, Hb, undo = ctx.to_basis(linear.weight.data.float(), H, name)
                result = self._gptq(ctx, (name,), W, Hb)
                linear.weight.data = ctx.from_basis(result.weight, undo).to(linear.weight.dtype).contiguous()
                state[name] = {"scale": result.scale, "zero": result.zero, "g_idx": result.g_idx, "basis": True}
                loss += result.loss
            return state, loss
        W = torch.cat([linear.weight.data for linear in linears], 0)
        result = self._gptq(ctx, names, W, H)
        start = 0
        for name, linear in zip(names, linears):
            stop = start + linear.out_features
            linear.weight.data = result.weight[start:stop].to(linear.weight.dtype).contiguous()
            state[name] = {
                "scale": result.scale[start:stop],
                "zero": result.zero[start:stop],
                "g_idx": result.g_idx,
            }
            start = stop
        return state, result.loss

    def _quantize_group(self, ctx: BlockContext, group, hessians: list) -> dict:
        """`hessians`: one per token set of the group (None: too few routed tokens, RTN)."""
        state, loss = {}, 0.0
        for names, H in zip(group.token_sets(), hessians):
            part_state, part_loss = self._quantize_part(ctx, names, H)
            state.update(part_state)
            loss += part_loss
        state[group.name + ".loss"] = loss
        return state

    def _hessian(self, ctx: BlockContext, group) -> list:
        return self._hessians(ctx, [group])[0]

    def _hessians(self, ctx: BlockContext, groups: list) -> list[list]:
        """Per group, per token set: the Hessian of its inputs (None: an expert with too few
        routed tokens, RTN), from one pass for a stage of groups."""
        return [[None if ctx.fallback(names, n) else H for names, (H, n) in zip(g.token_sets(), stats)]
                for g, stats in zip(groups, stage_hessians(ctx, groups))]

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> dict:
        state = {}
        if self.config.true_sequential:
            for stage in ctx.adapter.stages():  # a stage's groups do not feed each other
                for group, hessians in zip(stage, self._hessians(ctx, stage)):
                    state.update(self._quantize_group(ctx, group, hessians))
        else:
            hessians = [self._hessian(ctx, group) for group in ctx.adapter.groups]
            for group, H in zip(ctx.adapter.groups, hessians):
                state.update(self._quantize_group(ctx, group, H))
        return state
