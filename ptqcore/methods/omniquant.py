"""OmniQuant (optimization): Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization
for Large Language Models", ICLR 2024; reference code OpenGVLab/OmniQuant (`quantize/omniquant.py`,
`quantize/quantizer.py`, `models/int_llama_layer.py`, `models/transformation.py`).

Per block, as the reference's `omniquant()` loop:
- two streams of calibration activations: the quantized path (`ctx.inputs`, what the loop hands
  us) and a full-precision path kept in the method instance across blocks (both equal at block
  0). Before the block changes, its fp outputs on the fp stream are computed: they are the
  training targets and the fp stream of the next block;
- Learnable Weight Clipping (LWC): per output row, or per (row, group) with a group size, two
  logits initialised to 4.0; the grid is asymmetric min-max on `[sigmoid(low) * min,
  sigmoid(up) * max]`, rounding with a straight-through estimator, zero point `round(-min /
  scale)` (no gradient through it, as the reference);
- Learnable Equivalent Transformation (LET), no shifts: per-channel scales `s` between each norm
  and the linears it feeds (norm weight / s, linear columns * s: norm -> q/k/v and norm ->
  gate/up, the adapter's groups whose `prev` is a norm), between v and o (v rows / s, o columns
  * s) and between q and k (q rows / s, k rows * s: the attention scores are unchanged).
  Norm and v->o scales start from SmoothQuant's `max|X_j|^a / max|W_j|^(1-a)` (a = 0.5) with
  `max|X_j|` taken over the block's fp-stream inputs; the q/k scales start at 1. Scales below
  1e-2 in magnitude are pushed to +-1e-2 before every step (the reference's `truncate_number`);
- training: AdamW (weight decay 0) on the MSE between the block's output with transformed,
  fake-quantized weights on the quantized-path inputs and the fp block's output on the fp
  inputs; `epochs` passes over the windows in order, `batch_size` windows per step;
- afterwards the scales are folded into the norms and weights for good, the learned clipping is
  applied and the fake-quantized weights are written into the block's linears, so the model
  runs unchanged code. `process_block` returns plain state (scales, clip factors, grid, losses).

The forward with transformed weights is `torch.func.functional_call` on the block itself with
every parameter substituted, so the architecture's own module code runs unchanged.

Defaults: epochs 20 (the reference's scripts; its `main.py` default is 10), lwc_lr 1e-2,
let_lr 5e-3 (`main.py`; its weight-activation scripts use 1e-3), alpha 0.5, weight decay 0,
batch size 1, LWC and LET on, seed 0. The reference calibrates on 128 x 2048 tokens; that is a
profile setting here (`paper`: 128 x 2048, `cpu`: 32 x 512), not a knob of this method.

Deviations from the reference, each deliberate:
- No channel-wise shifts: the released reference sets `use_shift = False` for LLaMA models and
  for weight-only quantization (some later versions train zero-initialised shifts as biases).
- The reference's weight-only LLaMA scripts pass `--lwc` without `--let`; here `let` defaults to
  on (the full method of the paper). Use `let=False` to reproduce those scripts.
- The grid keeps the project's (GPTQ reference) semantics: the range always contains 0, an
  all-zero group gets [-1, 1], symmetric uses the midpoint zero `(maxq + 1) / 2`. With LWC off
  the result equals RTN exactly. The reference does not force 0 into the range (identical for
  any group with both signs) and its symmetric grid differs. Scales are clamped at 1e-5 as the
  reference (`CLIPMIN`).
- Partial last groups (576 columns in groups of 128) have their own clipping pair over their
  real columns; the reference pads with zeros and supports that only for symmetric grids
  (zero padding leaves the range unchanged once 0 is forced into it, so the two agree).
- GQA (SmolLM2: v_proj has 192 outputs, o_proj 576 inputs): the v->o scale has one entry per
  v row (192) and each o column uses the scale of the v row it reads (the same entry for all
  query heads of a key/value group), which keeps the transform exact. The q/k scale likewise
  has one entry per k row, shared by the query heads of its group, and is tied across the two
  halves of each head (the pairs that rotary embeddings rotate together), so the attention
  scores are unchanged exactly; the reference's MHA code scales each q row independently,
  which rotary embeddings do not commute with. Both reference versions start q/k at 1. No q/k
  scale where the adapter says q and k are normalised after their projections (`query_key_norm`:
  Qwen3-MoE, OLMoE).
- SmoothQuant's weight statistic is `max|W_j|` over all linears that read the channel (the
  reference uses only q_proj for q/k/v and only up_proj for gate/up). The activation statistic
  comes from the block's own fp-stream inputs, not a separate pass over another dataset.
- A partial last batch (windows not divisible by `batch_size`) is trained on; the reference
  drops it. No up->down transform (the reference has none for LLaMA).
- A NaN/Inf loss raises `NonFiniteError` naming the block (the reference drops into pdb).
- Training runs in float32 (the reference uses fp16 autocast unless `--deactive_amp`); the
  final weights are cast back to the block's dtype.
- Does not combine with a per-layer basis transform (QuIP): LWC learns on the weights the block
  computes with; a pipeline with one is refused with a clear error.
- Mixtures of experts: the block (router, every expert) is trained as a whole through its own
  forward, so each expert's clipping learns from the tokens routed to it; LET's norm scale also
  multiplies the router's (and shared-expert gate's) columns, which stay in full precision. An
  expert routed fewer than the loop's `min_expert_tokens` on the fp stream gets no LWC: plain
  min-max, i.e. RTN (recorded as a fallback).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..calib import BlockContext, NonFiniteError, _first_tensor
from ..models.adapters import Adapter
from ..quant import QuantSpec, check_group_size
from .base import Method, MethodConfig, MethodInfo

CLIPMIN = 1e-5  # the reference's floor for quantizer scales and SmoothQuant statistics
LET_MIN = 1e-2  # the reference's `truncate_number` threshold for LET scales
LWC_INIT = 4.0  # the reference's `init_value` of the clipping logits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


def lwc_fake_quant(
    w: torch.Tensor,
    spec: QuantSpec,
    up: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
    ste: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantize `w` [rows, cols] per row or per (row, group) of `spec.group_size` columns
    (a last partial group allowed), with the range shrunk by `sigmoid(up)` / `sigmoid(low)`
    ([rows, groups] logits; None: plain min-max). Returns (weight, scale, zero), the last two
    [rows, groups]. Differentiable in `w`, `up` and `low`."""
    rows, cols = w.shape
    g = spec.group_size or cols
    ngroups = -(-cols // g)
    pad = ngroups * g - cols
    x = (F.pad(w, (0, pad)) if pad else w).reshape(rows, ngroups, g)
    # Zero padding does not move a range that is forced to contain 0.
    xmax = x.amax(-1).clamp(min=0) * spec.clip_ratio
    xmin = x.amin(-1).clamp(max=0) * spec.clip_ratio
    if up is not None:
        xmax = torch.sigmoid(up) * xmax
        xmin = torch.sigmoid(low) * xmin
    maxq = spec.maxq
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=CLIPMIN)
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)  # no gradient through the zero point (reference)
    s, z = scale[..., None], zero[..., None]
    y = x / s
    q = torch.clamp((round_ste(y) if ste else torch.round(y)) + z, 0, maxq)
    out = ((q - z) * s).reshape(rows, ngroups * g)
    return (out[:, :cols] if pad else out), scale, zero


@dataclass(frozen=True)
class AttentionLayout:
    """Names and head geometry the q/k and v/o transforms need."""

    q: str
    k: str
    v: str
    o: str
    head_dim: int
    k_index: torch.Tensor  # for each q row: the k row it meets in QK^T
    v_index: torch.Tensor  # for each o column: the v row it reads


def _head_index(rows: int, kv_rows: int, head_dim: int) -> torch.Tensor:
    """Row r = head h, dim d of a per-query-head tensor -> row of the key/value head of h."""
    r = torch.arange(rows)
    rep = rows // kv_rows
    return (r // head_dim) // rep * head_dim + r % head_dim


def attention_layout(block: nn.Module, adapter: Adapter) -> AttentionLayout | None:
    """q/k/v/o names and head geometry, or None when the block does not show them.

    v and o come from `adapter.value_out`; q and k from `adapter.query_key` when the adapter
    has it, else the other two linears of the group that contains v (the llama adapter lists
    q, k, v). `head_dim` is read from the module that holds v (`LlamaAttention.head_dim`).
    """
    if adapter.value_out is None:
        return None
    v, o = adapter.value_out
    qk = getattr(adapter, "query_key", None)
    if qk is None:
        group = next((g for g in adapter.groups if v in g.linears), None)
        others = [name for name in group.linears if name != v] if group else []
        if len(others) != 2:
            return None
        qk = tuple(others)
    q, k = qk
    parent = block.get_submodule(v.rsplit(".", 1)[0]) if "." in v else block
    head_dim = getattr(parent, "head_dim", None)
    if head_dim is None:
        return None
    lq, lk, lv, lo = (block.get_submodule(n) for n in (q, k, v, o))
    ok = (
        lq.out_features == lo.in_features
        and lq.out_features % lk.out_features == 0
        and lo.in_features % lv.out_features == 0
        and lk.out_features % head_dim == 0
        and lv.out_features % head_dim == 0
        and head_dim % 2 == 0
    )
    if not ok:
        return None
    return AttentionLayout(
        q, k, v, o, head_dim,
        _head_index(lq.out_features, lk.out_features, head_dim),
        _head_index(lo.in_features, lv.out_features, head_dim),
    )


def smooth_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale `max|X|^a / max|W|^(1-a)` with the reference's floors."""
    return (act_max.clamp(min=CLIPMIN).pow(alpha) / weight_max.clamp(min=CLIPMIN).pow(1 - alpha)).clamp(min=CLIPMIN)


class OmniBlock:
    """The trainable view of one block: LWC logits, LET scales, and the block's parameters in
    float32, combined into the parameters of a `functional_call` of the block.

    `act_max` maps linear names to the per-channel max |input| (needed for LET: the first
    linear of each norm group and the o projection).
    """

    def __init__(
        self,
        block: nn.Module,
        adapter: Adapter,
        spec: QuantSpec | None,
        lwc: bool = True,
        let: bool = True,
        act_max: dict[str, torch.Tensor] | None = None,
        alpha: float = 0.5,
        frozen: frozenset[str] = frozenset(),
    ):
        self.block, self.adapter, self.spec = block, adapter, spec
        self.base = {n: p.detach().float() for n, p in block.named_parameters()}
        self.linear_names = adapter.linear_names()
        # LET between a norm and its linears needs the norm's weight to absorb 1 / s.
        self.norm_groups = [g for g in adapter.norm_groups() if f"{g.prev}.weight" in self.base]
        self.lwc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if lwc and spec is not None:
            for name in self.linear_names:
                if name in frozen:  # an expert without enough routed tokens: plain min-max (RTN)
                    continue
                w = self.base[f"{name}.weight"]
                groups = -(-w.shape[1] // (spec.group_size or w.shape[1]))
                self.lwc[name] = tuple(
                    torch.full((w.shape[0], groups), LWC_INIT, device=w.device, requires_grad=True) for _ in range(2)
                )
        self.let: dict[str, torch.Tensor] = {}
        self.layout = attention_layout(block, adapter) if let else None
        if let:
            if act_max is None:
                raise ValueError("LET needs the activation maxima of the block's inputs (act_max)")
            for group in self.norm_groups:
                wmax = torch.cat([self.base[f"{n}.weight"] for n in group.linears]).abs().amax(0)
                s = smooth_scale(act_max[group.input_module].float(), wmax, alpha)
                self.let[group.name] = s.clone().requires_grad_()
            if self.layout is not None:
                L = self.layout
                kv_rows = self.base[f"{L.v}.weight"].shape[0]
                act = self._reduce_to_kv(act_max[L.o].float(), kv_rows)
                wmax = self._reduce_to_kv(self.base[f"{L.o}.weight"].abs().amax(0), kv_rows)
                self.let["vo"] = smooth_scale(act, wmax, alpha).clone().requires_grad_()
                if not adapter.query_key_norm:  # a norm after q and k would undo the scales
                    k_rows = self.base[f"{L.k}.weight"].shape[0]
                    self.let["qk"] = torch.ones(k_rows // 2, device=wmax.device, requires_grad=True)

    def _reduce_to_kv(self, per_column: torch.Tensor, kv_rows: int) -> torch.Tensor:
        """Max over the o columns that read the same v row."""
        out = torch.full((kv_rows,), -math.inf, device=per_column.device)
        return out.scatter_reduce(0, self.layout.v_index.to(per_column.device), per_column, "amax")

    def _qk_rows(self, s: torch.Tensor) -> torch.Tensor:
        """Per-k-row scale from the per-(head, rotary pair) parameter."""
        half = self.layout.head_dim // 2
        s = s.view(-1, half)
        return torch.cat([s, s], 1).reshape(-1)

    def let_parameters(self) -> list[torch.Tensor]:
        return list(self.let.values())

    def lwc_parameters(self) -> list[torch.Tensor]:
        return [p for pair in self.lwc.values() for p in pair]

    @torch.no_grad()
    def truncate_(self) -> None:
        """Push LET scales below LET_MIN in magnitude to +-LET_MIN (reference `truncate_number`)."""
        for s in self.let.values():
            small = s.abs() < LET_MIN
            s.copy_(torch.where(small, torch.where(s < 0, -LET_MIN, LET_MIN), s))

    def _transformed(self) -> dict[str, torch.Tensor]:
        """The block's parameters with the LET scales applied (unquantized)."""
        P = dict(self.base)

        def mul(key, factor):
            if key in P:
                P[key] = P[key] * factor

        for group in self.norm_groups if self.let else ():
            s = self.let[group.name]
            mul(f"{group.prev}.weight", 1 / s)
            mul(f"{group.prev}.bias", 1 / s)
            for name in group.fold_targets:
                mul(f"{name}.weight", s[None, :])
        if "vo" in self.let:
            L, s = self.layout, self.let["vo"]
            mul(f"{L.v}.weight", 1 / s[:, None])
            mul(f"{L.v}.bias", 1 / s)
            mul(f"{L.o}.weight", s[L.v_index.to(s.device)][None, :])
        if "qk" in self.let:
            L = self.layout
            sk = self._qk_rows(self.let["qk"])
            sq = sk[L.k_index.to(sk.device)]
            mul(f"{L.q}.weight", 1 / sq[:, None])
            mul(f"{L.q}.bias", 1 / sq)
            mul(f"{L.k}.weight", sk[:, None])
            mul(f"{L.k}.bias", sk)
        return P

    def params(self, quantize: bool = True) -> dict[str, torch.Tensor]:
        """Parameters for `functional_call(block, ...)`: transformed and (optionally) fake-quantized."""
        P = self._transformed()
        if quantize:
            for name in self.linear_names:
                up, low = self.lwc.get(name, (None, None))
                P[f"{name}.weight"] = lwc_fake_quant(P[f"{name}.weight"], self.spec, up, low)[0]
        return P

    def forward(self, x: torch.Tensor, kwargs: dict, quantize: bool = True) -> torch.Tensor:
        return _first_tensor(functional_call(self.block, self.params(quantize), (x,), kwargs))

    __call__ = forward

    @torch.no_grad()
    def fold(self) -> dict:
        """Write the transformed, quantized weights (and divided norms) into the block for good;
        return the plain state."""
        self.truncate_()
        P = self._transformed()
        state: dict = {}
        for name in self.linear_names:
            up, low = self.lwc.get(name, (None, None))
            w, scale, zero = lwc_fake_quant(P[f"{name}.weight"], self.spec, up, low, ste=False)
            P[f"{name}.weight"] = w
            cols = w.shape[1]
            g_idx = torch.arange(cols, device=w.device) // (self.spec.group_size or cols)
            entry = {"scale": scale, "zero": zero, "g_idx": g_idx}
            if up is not None:
                entry.update(clip_up=torch.sigmoid(up), clip_low=torch.sigmoid(low))
            state[name] = entry
        params = dict(self.block.named_parameters())
        for key, value in P.items():
            if value is not self.base[key]:
                params[key].data = value.to(params[key].dtype).contiguous()
        state["let"] = {
            name: (self._qk_rows(s) if name == "qk" else s).detach().clone() for name, s in self.let.items()
        }
        return state


@dataclass(frozen=True)
class OmniQuantConfig(MethodConfig):
    epochs: int = 20
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    lwc: bool = True
    let: bool = True
    batch_size: int = 1
    alpha: float = 0.5
    wd: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"OmniQuant epochs must be an integer >= 0, got {self.epochs!r}")
        if not is_int(self.batch_size) or self.batch_size <= 0:
            raise ValueError(f"OmniQuant batch_size must be a positive integer, got {self.batch_size!r}")
        for knob in ("lwc_lr", "let_lr"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"OmniQuant {knob} must be in (0, 1), got {value!r}")
        for knob in ("lwc", "let"):
            if not isinstance(getattr(self, knob), bool):
                raise ValueError(f"OmniQuant {knob} must be true or false, got {getattr(self, knob)!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"OmniQuant alpha must be in [0, 1], got {self.alpha!r}")
        if not self.wd >= 0:
            raise ValueError(f"OmniQuant wd must be >= 0, got {self.wd!r}")
        if not is_int(self.seed):
            raise ValueError(f"OmniQuant seed must be an integer, got {self.seed!r}")
        if self.epochs > 0 and not (self.lwc or self.let):
            raise ValueError("OmniQuant with epochs > 0 needs lwc or let (nothing to train); use epochs=0 or rtn")
        if self.spec is not None and self.spec.mse:
            raise ValueError(
                "OmniQuant learns its clipping (LWC); the MSE clip search (--mse) does not combine with it"
            )


def _normal(obj, dtype=None):
    """A copy of (nested) tensors that autograd can use: not inference tensors, optionally cast."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().clone()
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out
    if isinstance(obj, tuple):
        return tuple(_normal(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_normal(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _normal(v, dtype) for k, v in obj.items()}
    return obj


class OmniQuant(Method):
    info = MethodInfo(
        "omniquant", "optimization", "Shao et al., OmniQuant, ICLR 2024", "quantizer", needs_calibration=True
    )
    Config = OmniQuantConfig

    def __init__(self, config: OmniQuantConfig):
        super().__init__(config)
        self._fp_inputs: torch.Tensor | None = None  # the full-precision stream, across blocks

    def _fp_pass(self, ctx: BlockContext, fp_in: torch.Tensor, kwargs: dict, watch: list[str],
                 count: list[str] = ()):
        """The block's fp outputs on the fp stream, the per-channel max |input| of `watch` and the
        number of tokens each module of `count` (routed experts) received."""
        act_max: dict[str, torch.Tensor] = {}
        tokens = dict.fromkeys(count, 0)

        def hook(name):
            def record(module, args):
                m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)
            return record

        def counter(name):
            def record(module, args):
                tokens[name] += args[0].numel() // args[0].shape[-1]
            return record

        handles = [ctx.block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in watch]
        handles += [ctx.block.get_submodule(n).register_forward_pre_hook(counter(n)) for n in count]
        try:
            with torch.no_grad():
                outs = [
                    _first_tensor(ctx.block(x.to(ctx.inputs.dtype), **ctx.kwargs)).float()
                    for x in fp_in.split(ctx.batch_size)
                ]
        finally:
            for h in handles:
                h.remove()
        return torch.cat(outs), act_max, tokens

    def process_block(self, ctx: BlockContext) -> dict:
        cfg = self.config
        if ctx.inputs is None:
            raise ValueError("omniquant needs calibration data (block inputs)")
        if ctx.basis:
            raise ValueError(
                "omniquant does not combine with a basis transform (e.g. quip): it learns on the block's own weights"
            )
        for name, linear in ctx.adapter.linears(ctx.block).items():
            check_group_size(linear.in_features, cfg.spec, f"{name} of block {ctx.index}")
        device = ctx.inputs.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.inference_mode(False), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            quant_in = _normal(ctx.inputs, torch.float32)
            kwargs = _normal(ctx.kwargs, torch.float32)
            if ctx.index == 0 or self._fp_inputs is None or self._fp_inputs.shape != quant_in.shape:
                if ctx.index != 0:
                    warnings.warn(f"OmniQuant: no full-precision stream for block {ctx.index} (block 0 of this run "
                                  "was not seen); its targets come from the inputs it was handed")
                self._fp_inputs = quant_in.clone()  # both streams start from block 0's inputs
            watch = []
            if cfg.let:
                watch = [g.input_module for g in ctx.adapter.norm_groups()]
                if ctx.adapter.value_out is not None:
                    watch.append(ctx.adapter.value_out[1])
            parts = [part for group in ctx.adapter.groups for part in group.token_sets()
                     if ctx.adapter.is_routed(part[0])]
            fp_out, act_max, tokens = self._fp_pass(ctx, self._fp_inputs, ctx.kwargs, watch, [p[0] for p in parts])
            frozen = frozenset(name for part in parts if ctx.fallback(part, tokens[part[0]]) for name in part)
            omni = OmniBlock(ctx.block, ctx.adapter, cfg.spec, cfg.lwc, cfg.let, act_max, cfg.alpha, frozen)
            losses = self._train(ctx, omni, quant_in, fp_out, kwargs) if cfg.epochs else []
            state = omni.fold()
            self._fp_inputs = fp_out
        state["loss"] = losses
        return state

    def _train(self, ctx, omni: OmniBlock, quant_in, fp_out, kwargs) -> list[float]:
        cfg = self.config
        groups = []
        if omni.let:
            groups.append({"params": omni.let_parameters(), "lr": cfg.let_lr})
        if omni.lwc:
            groups.append({"params": omni.lwc_parameters(), "lr": cfg.lwc_lr})
        if not groups:
            return []
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.wd)
        n, bs = quant_in.shape[0], cfg.batch_size
        losses = []
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                total = 0.0
                for step, start in enumerate(range(0, n, bs)):
                    omni.truncate_()
                    out = omni.forward(quant_in[start : start + bs], kwargs)
                    loss = F.mse_loss(out, fp_out[start : start + bs])
                    value = loss.item()
                    if not math.isfinite(value):
                        raise NonFiniteError(
                            f"NaN or Inf in the OmniQuant loss of block {ctx.index} "
                            f"(epoch {epoch + 1}, step {step + 1}, loss {value})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += value * out.shape[0]
                losses.append(total / n)
        return losses
