"""AWQ (salience): Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration", MLSys 2024; reference code mit-han-lab/llm-awq (`auto_scale.py`,
`auto_clip.py`, `quantizer.py`, `pre_quant.py`).

AWQ is an equivalence transform searched against the quantizer that follows it (RTN by
default, as the reference's `pseudo_quantize_model_weight`; or GPTQ in `awq+gptq`). Per block,
as the reference's `run_awq`:

1. The inputs of every group of linears are captured in one pass of the block.
2. Scale search (`auto_scale_block`), for each adapter group in order (norm -> q/k/v judged
   by the attention module, v -> o, norm -> gate/up judged by the MLP, up -> down):
   `x_mean` = mean |x| per input channel over all calibration tokens; for the ratios
   `a = i / n_grid`, i = 0 .. n_grid - 1: `s = x_mean^a` clamped to >= 1e-4 and divided by
   `sqrt(s.max() * s.min())`; the group's weights become `Q(W * s) / s` (Q = the spec's
   fake quantizer) and the loss is the MSE between the inspect module's output and its
   full-precision output on the group's input. The best `s` is folded into the op before
   the group (`ptqcore.transforms.smooth.fold_scale`). `duo_scaling` is AutoAWQ's
   variant `s = x_mean^a / (w_mean^(1-a) + 1e-4)`.
3. Clip search (`auto_clip_layer`) on the scaled weights and scaled inputs: per output row
   and input group, `max_val = org_max * (1 - i / n_grid)` for i < max_shrink * n_grid,
   objective = mean over `n_sample_token` tokens (every `n_tokens // n_sample_token`-th) of
   the squared error of that group's partial output, rows in batches of 256; q_proj/k_proj
   are skipped ("due to qk bmm, it is hard to clip precisely"; the adapter's `query_key`);
   applied as a clamp of the weights into [-max_val, max_val] (`apply_clip`).

Search and application are separate: `search_scales` / `search_clip` are functions returning
plain tensors, `process_block` returns the plain per-block state (scales, ratios, losses, clip
maxima, skips) and `apply_awq_block` / `apply_awq` replay such a state on a fresh model.

Defaults: n_grid 20, max_shrink 0.5, n_sample_token 512, clip on, duo_scaling off (the
reference's original scale `x_mean^a`), search_tokens 2048.

Deviations from the reference, each in one line:
- Quantizer inside the searches: the spec's grid (GPTQ-reference semantics: range
  [min(w, 0), max(w, 0)], i.e. the zero forced into the range, integer zero, all-zero rows
  on [-1, 1]); llm-awq's `pseudo_quantize_tensor` uses the group's own [min, max] (zero may
  fall outside and is clamped into [0, maxq]) and floors the range at 1e-5.
- Partial last groups (SmolLM2's 576 = 4 x 128 + 64) work: groups are column ranges
  (`group_bounds`); the reference asserts that the group size divides the layer.
- The scale-search loss is measured on whole calibration windows totalling at most
  `search_tokens` tokens (evenly spaced windows; default 2048 = 4 of the cpu profile's
  32 x 512) instead of all of them; `x_mean` and the clip search use every token as the
  reference. On SmolLM2 with the cpu profile an AWQ block takes ~4.6 s this way and ~24 s
  with all 16k tokens (2 idle CPU cores), and the chosen ratios barely move; set
  `search_tokens` >= N x L for the reference's behaviour.
- Block inputs come from the already processed (scaled and quantized) blocks before it, as
  every method of the one calibration loop sees them; llm-awq feeds full-precision outputs.
- v -> o is scaled only when v_proj's outputs match o_proj's inputs (llm-awq: when their
  weights have the same shape); with grouped-query attention the group is skipped and the
  state says why. The clip skip of q/k reads the adapter's `query_key`; without it, the
  reference's rule on layer names ("q_", "k_" in the name).
- The clip objective is computed with one matmul per input group instead of the reference's
  broadcast product [rows, tokens, groups, group size] (the same sums, in another order).
- The inspect module receives only the block kwargs its `forward` names (AutoAWQ's
  `_sanitize_kwargs`), and the error is accumulated over batches of `ctx.batch_size` windows.

Mixtures of experts (what the original benchmark could not run): one scale vector per input
norm, searched jointly over every expert it feeds: the adapter's `moe_in` group holds all
experts' gate/up (and the shared expert's), the loss is the MSE of the whole MoE block's output
(router included, its weights scaled but not quantized), and the scale is folded into the norm,
the experts and the router (`group.readers`). Each expert's up -> down scale is searched on the
tokens routed to it (at most `search_tokens` of them, evenly spaced), and each expert's clip on
its routed tokens. An expert routed fewer than the loop's `min_expert_tokens` gets neither (its
quantizer rounds it plainly: RTN) and is recorded as a fallback.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..calib import BlockContext
from ..models.adapters import Adapter, LinearGroup
from ..quant import QuantSpec, check_group_size, fake_quant, find_params, group_bounds
from ..transforms.smooth import fold_scale, fold_skip_reason
from .base import Method, MethodConfig, MethodInfo

# The reference's clip skip ("due to qk bmm, it is hard to clip precisely"), on layer names.
NO_CLIP = ("q_", "k_")


class ScaleSearch(NamedTuple):
    scales: torch.Tensor  # [C] the best scale per input channel
    ratio: float  # the exponent a that gave it
    losses: list[float]  # the inspect-module MSE for each ratio of the grid


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel over every token (`get_act_scale`)."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


def weight_mean(weights: Sequence[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """AutoAWQ's `w_mean` for duo scaling: |W| / max|W| within each quantization group, averaged
    over the output rows of all the group's linears (per input channel)."""
    w = torch.cat([weight.float() for weight in weights], 0).abs()
    out = torch.empty_like(w)
    for start, end in group_bounds(w.shape[1], group_size):
        out[:, start:end] = w[:, start:end] / (w[:, start:end].amax(1, keepdim=True) + 1e-6)
    return out.mean(0)


def fake_quant_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`fake_quant_weight(w, spec)` bit for bit (same `find_params` / `fake_quant` per group),
    without its [rows, cols] gathers of scale and zero: ~3x faster inside the search loop."""
    w = w.float()
    out = torch.empty_like(w)
    for start, end in group_bounds(w.shape[1], spec.group_size):
        scale, zero = find_params(w[:, start:end], spec)
        out[:, start:end] = fake_quant(w[:, start:end], scale, zero, spec.maxq)
    return out


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """`x_mean^a` (or `x_mean^a / (w_mean^(1-a) + 1e-4)`), clamped >= 1e-4, normalised by
    `sqrt(max * min)`."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def call_module(module: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> torch.Tensor:
    """Run `module` on `x` with the entries of `kwargs` its `forward` names (rotary embeddings,
    mask, ... for an attention module; none for a linear or an MLP); the first output if it
    returns a tuple."""
    params = inspect.signature(module.forward).parameters
    named = [name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    extra = {k: v for k, v in (kwargs or {}).items() if k in named[1:]}
    out = module(x, **extra)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def search_scales(
    module: nn.Module,
    linears: Sequence[nn.Linear],
    x: torch.Tensor,
    x_mean: torch.Tensor,
    spec: QuantSpec,
    kwargs: dict | None = None,
    n_grid: int = 20,
    w_mean: torch.Tensor | None = None,
    batch_size: int = 8,
) -> ScaleSearch:
    """The reference's `_search_module_scale`: the per-channel scale for `linears` (which read
    `x` [N, L, C], or [tokens, C]) that minimises the MSE of `module`'s output when their
    weights are replaced by `Q(W * s) / s`. The linears' weights are restored before returning."""
    batches = [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
    reference = [call_module(module, xb, kwargs) for xb in batches]
    numel = sum(r.numel() for r in reference)
    originals = [linear.weight.data for linear in linears]
    losses: list[float] = []
    best = (float("inf"), -1.0, None)
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = candidate_scales(x_mean, ratio, w_mean)
            for linear, w in zip(linears, originals):
                ws = w.float() * s[None, :]
                linear.weight.data = (fake_quant_groups(ws, spec) / s[None, :]).to(w.dtype)
            loss = sum((ref - call_module(module, xb, kwargs)).float().pow(2).sum().item()
                       for ref, xb in zip(reference, batches)) / numel
            losses.append(loss)
            if loss < best[0]:
                best = (loss, ratio, s)
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.data = w
    if best[2] is None:
        raise RuntimeError(f"AWQ scale search found no finite loss: {losses}")
    return ScaleSearch(best[2].clone(), best[1], losses)


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_token: int = 512,
    oc_batch_size: int = 256,
) -> torch.Tensor:
    """The reference's `auto_clip_layer`: per output row and input group of `w` [rows, C], the
    clip value `max|w| * (1 - i / n_grid)` (i < max_shrink * n_grid) whose clamped, quantized
    weights give the least mean squared error of that group's partial output on every
    `n_tokens // n_sample_token`-th token of `x` [..., C]. Returns [rows, groups]."""
    x = x.reshape(-1, x.shape[-1])
    x = x[:: max(1, x.shape[0] // n_sample_token)].float()
    w = w.float()
    rows, columns = w.shape
    bounds = group_bounds(columns, spec.group_size)
    best_all = torch.empty(rows, len(bounds), device=w.device)
    for g, (start, end) in enumerate(bounds):
        xg = x[:, start:end]
        for r0 in range(0, rows, oc_batch_size):
            wg = w[r0 : r0 + oc_batch_size, start:end]
            org_out = xg @ wg.t()  # [tokens, rows in batch]
            org_max = wg.abs().amax(1, keepdim=True)
            best = org_max.clone()
            min_err = torch.full_like(org_max, float("inf"))
            for i in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - i / n_grid)
                cur = torch.clamp(wg, -max_val, max_val)
                scale, zero = find_params(cur, spec)
                err = (xg @ fake_quant(cur, scale, zero, spec.maxq).t() - org_out).pow(2).mean(0)[:, None]
                better = err < min_err
                min_err = torch.where(better, err, min_err)
                best = torch.where(better, max_val, best)
            best_all[r0 : r0 + oc_batch_size, g] = best[:, 0]
    return best_all


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, group_size: int | None) -> None:
    """Clamp each (row, input group) of `linear.weight` into [-max_val, max_val]. In place."""
    w = linear.weight.data
    bounds = group_bounds(w.shape[1], group_size)
    if tuple(max_val.shape) != (w.shape[0], len(bounds)):
        raise ValueError(f"clip maxima of shape {tuple(max_val.shape)} for a weight {tuple(w.shape)} "
                         f"with {len(bounds)} groups")
    out = w.clone()
    for g, (start, end) in enumerate(bounds):
        m = max_val[:, g : g + 1].to(device=w.device, dtype=w.dtype)
        out[:, start:end] = torch.clamp(w[:, start:end], -m, m)
    linear.weight.data = out


def clipped_linears(adapter: Adapter, group: LinearGroup) -> list[str]:
    """The group's linears the clip search covers: all but the query/key projections (the
    adapter's `query_key` when it names them, else the reference's rule on layer names)."""
    query_key = getattr(adapter, "query_key", None)
    if query_key:
        return [name for name in group.linears if name not in query_key]
    return [name for name in group.linears if not any(tag in name for tag in NO_CLIP)]


@torch.no_grad()
def apply_awq_block(block: nn.Module, adapter: Adapter, state: dict) -> None:
    """Replay one block's AWQ state (as returned by `AWQ.process_block`): fold the scales in
    group order, then clamp the clipped linears."""
    for group in adapter.groups:
        if group.name in state["scales"]:
            fold_scale(block, group, state["scales"][group.name]["scales"])
    for name, max_val in state["clip"].items():
        apply_clip(block.get_submodule(name), max_val, state["group_size"])


def apply_awq(model: nn.Module, adapter: Adapter, states: Sequence[dict]) -> None:
    """Replay per-block AWQ states on every block of `model` (e.g. a cached search)."""
    blocks = adapter.get_blocks(model)
    if len(states) != len(blocks):
        raise ValueError(f"{len(states)} AWQ block states for a model of {len(blocks)} blocks")
    for block, state in zip(blocks, states):
        apply_awq_block(block, adapter.for_block(block), state)


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    n_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512
    clip: bool = True
    duo_scaling: bool = False
    search_tokens: int | None = 2048

    def __post_init__(self) -> None:
        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if not positive_int(self.n_grid):
            raise ValueError(f"AWQ n_grid must be a positive integer, got {self.n_grid!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0 < self.max_shrink < 1:
            raise ValueError(f"AWQ max_shrink must be in (0, 1), got {self.max_shrink!r}")
        if not positive_int(self.n_sample_token):
            raise ValueError(f"AWQ n_sample_token must be a positive integer, got {self.n_sample_token!r}")
        for knob in ("clip", "duo_scaling"):
            if not isinstance(getattr(self, knob), bool):
                raise ValueError(f"AWQ {knob} must be true or false, got {getattr(self, knob)!r}")
        if self.search_tokens is not None and not positive_int(self.search_tokens):
            raise ValueError(f"AWQ search_tokens must be a positive integer (or None: all), got {self.search_tokens!r}")


def _capture_group_inputs(ctx: BlockContext) -> tuple[dict[str, torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
    """From one pass of the block: the whole input of every adapter group ([N, L, C]: the input of
    its first linear, or of `group.input_at` in an MoE group) and the input of each of its token
    sets (`group.token_sets()`; an expert's routed tokens, [T, C]; a dense group's only set is
    the whole input, the same tensor)."""
    whole: dict[str, list[torch.Tensor]] = {group.name: [] for group in ctx.adapter.groups}
    parts: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def grab(store, key):
        def hook(mod, args, kwargs):
            store[key].append((args[0] if args else kwargs["hidden_states"]).detach())
        return hook

    for group in ctx.adapter.groups:
        module = ctx.block.get_submodule(group.input_module)
        handles.append(module.register_forward_pre_hook(grab(whole, group.name), with_kwargs=True))
        if group.parts:
            for i, names in enumerate(group.token_sets()):
                parts[(group.name, i)] = []
                handles.append(ctx.block.get_submodule(names[0]).register_forward_pre_hook(
                    grab(parts, (group.name, i)), with_kwargs=True))
    try:
        with torch.no_grad():
            for x in ctx.batches():
                ctx.block(x, **ctx.kwargs)
    finally:
        for handle in handles:
            handle.remove()

    def cat(chunks: list[torch.Tensor], columns: int) -> torch.Tensor:
        if not chunks:  # an expert no token was routed to
            return torch.empty(0, columns, device=ctx.inputs.device, dtype=ctx.inputs.dtype)
        return torch.cat(chunks)

    inputs = {}
    for group in ctx.adapter.groups:
        columns = ctx.linear(group.linears[0]).in_features
        inputs[group.name] = cat(whole[group.name], columns)
    part_inputs = {}
    for group in ctx.adapter.groups:
        for i, names in enumerate(group.token_sets()):
            key = (group.name, i)
            part_inputs[key] = cat(parts[key], ctx.linear(names[0]).in_features) if group.parts else inputs[group.name]
    return inputs, part_inputs


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def search_window_indices(n_windows: int, seqlen: int, search_tokens: int | None) -> torch.Tensor:
    """Evenly spaced whole windows with at most `search_tokens` tokens (at least one window)."""
    if search_tokens is None or search_tokens >= n_windows * seqlen:
        return torch.arange(n_windows)
    keep = max(1, search_tokens // seqlen)
    return torch.arange(0, n_windows, n_windows / keep).long()[:keep]


class AWQ(Method):
    info = MethodInfo(
        "awq", "salience", "Lin et al., AWQ, MLSys 2024", "transform", needs_calibration=True, default_quantizer="rtn"
    )
    Config = AWQConfig

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        if config.spec is None:
            raise ValueError("method awq searches against a weight spec (bits, group size); none given")

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> dict:
        cfg, spec = self.config, self.config.spec
        if ctx.inputs is None:
            raise ValueError("AWQ needs calibration inputs")
        for name, linear in ctx.adapter.linears(ctx.block).items():
            check_group_size(linear.in_features, spec, f"{name} of block {ctx.index}")
        inputs, part_inputs = _capture_group_inputs(ctx)
        windows = search_window_indices(ctx.inputs.shape[0], ctx.inputs.shape[1], cfg.search_tokens)
        state: dict = {"scales": {}, "clip": {}, "skipped": {}, "group_size": spec.group_size,
                       "search_windows": len(windows)}
        for group in ctx.adapter.groups:
            reason = fold_skip_reason(ctx.block, group)
            if reason is not None:
                state["skipped"][group.name] = reason
                continue
            x = inputs[group.name]
            if not group.parts and ctx.fallback(group.linears, _tokens(x)):  # an expert's down, too few tokens
                state["skipped"][group.name] = f"{_tokens(x)} routed calibration tokens (fallback: RTN)"
                continue
            linears = [ctx.linear(name) for name in group.linears]
            w_mean = weight_mean([lin.weight for lin in linears], spec.group_size) if cfg.duo_scaling else None
            if x.dim() == 3:  # whole windows
                search_x, batch = x[windows], ctx.batch_size
            else:  # routed tokens [T, C]: evenly spaced, at most search_tokens
                step = max(1, _tokens(x) // cfg.search_tokens) if cfg.search_tokens else 1
                search_x = x[::step][: cfg.search_tokens]
                batch = ctx.batch_size * ctx.inputs.shape[1]
            found = search_scales(
                ctx.block.get_submodule(group.inspect), linears, search_x, activation_mean(x), spec,
                ctx.kwargs, cfg.n_grid, w_mean, batch,
            )
            fold_scale(ctx.block, group, found.scales)
            x.div_(found.scales)  # the group's input in the scaled block (the reference's input_feat /= s)
            for i in range(len(group.token_sets())):
                if part_inputs[(group.name, i)] is not x:
                    part_inputs[(group.name, i)].div_(found.scales)
            state["scales"][group.name] = {
                "prev": group.prev, "linears": list(group.linears), "scales": found.scales,
                "ratio": found.ratio, "loss": min(found.losses), "losses": found.losses,
            }
        if cfg.clip:
            for group in ctx.adapter.groups:
                clipped = clipped_linears(ctx.adapter, group)
                for i, names in enumerate(group.token_sets()):
                    x = part_inputs[(group.name, i)]
                    if ctx.fallback(names, _tokens(x)):
                        continue
                    for name in (n for n in names if n in clipped):
                        state["clip"][name] = search_clip(
                            ctx.linear(name).weight, x, spec, cfg.n_grid, cfg.max_shrink, cfg.n_sample_token,
                        )
            for name, max_val in state["clip"].items():
                apply_clip(ctx.linear(name), max_val, spec.group_size)
        return state
