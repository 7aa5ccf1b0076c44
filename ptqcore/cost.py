"""What a quantized model costs to store: effective bits per weight and packed model size.

Counted as the GPTQ checkpoint format stores a weight-only setting (the format of
`ptqcore.export`, understood by transformers/optimum/gptqmodel), per quantized linear with
`in` inputs, `out` outputs, `G` groups (`ceil(in / group_size)`, a partial last group counts as
one; 1 per channel):

    qweight  int32 [in * bits / 32, out]   the codes, `bits` each
    qzeros   int32 [G, out * bits / 32]     one `bits`-wide zero point per (group, output)
    scales   fp16  [G, out]                 16 bits per (group, output)
    g_idx    int32 [in]                     the group of every input column (act-order)

`bits_per_weight` = all of that, in bits, over the number of quantized weights: e.g. W4 g128 on
a 576 x 576 layer is 4 + 5 * (16 + 4) / 576 + 32 / 576 = 4.23 bits (5 groups: 4 x 128 + 64).
The nominal `bits + (16 + bits) / group_size` ignores partial groups and `g_idx`.
`model_bytes` = the packed linears plus every other tensor (embeddings, `lm_head`, norms,
biases) in float16, each shared tensor once (tied embeddings). A full-precision run is counted
as float16 storage (16 bits per weight), how checkpoints are released, although the CPU runs
compute in float32. Activation settings (`a8`, `a4`) are dynamic and store nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from .quant import QuantSpec

PACK_BITS = 32  # the int32 words of qweight / qzeros
SCALE_BITS = 16  # float16 scales
GIDX_BITS = 32  # int32 g_idx
OTHER_BITS = 16  # everything that is not a quantized linear, in float16


def packed_words(values: int, bits: int) -> int:
    """int32 words holding `values` codes of `bits` each, packed as one bit stream."""
    return math.ceil(values * bits / PACK_BITS)


def linear_packed_bytes(out_features: int, in_features: int, spec: QuantSpec, bias: bool = False) -> int:
    """Bytes of one linear in the GPTQ format (qweight + qzeros + scales + g_idx [+ fp16 bias])."""
    groups = 1 if spec.group_size is None else math.ceil(in_features / spec.group_size)
    qweight = packed_words(in_features, spec.bits) * out_features * PACK_BITS
    qzeros = groups * packed_words(out_features, spec.bits) * PACK_BITS
    scales = groups * out_features * SCALE_BITS
    g_idx = in_features * GIDX_BITS
    return (qweight + qzeros + scales + g_idx) // 8 + (out_features * 2 if bias else 0)


@dataclass(frozen=True)
class ModelCost:
    bits_per_weight: float  # effective bits of the quantized linears, scales/zeros/g_idx included
    model_bytes: int  # the whole model stored packed (others in float16)
    quantized_weights: int  # weights inside quantized linears
    other_params: int  # parameters stored in float16
    nominal_bits: float  # bits + (16 + bits) / group_size (or 16 for fp)

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_linears(model: nn.Module, adapter) -> dict[str, nn.Linear]:
    """{full module name: linear} of every linear the block loop quantizes."""
    names = {id(module): name for name, module in model.named_modules()}
    out = {}
    for block in adapter.get_blocks(model):
        for linear in adapter.linears(block).values():
            out[names[id(linear)]] = linear
    return out


def model_cost(model: nn.Module, adapter, spec: QuantSpec | None) -> ModelCost:
    """The storage cost of `model` with its block linears quantized by `spec` (None: fp16)."""
    linears = quantized_linears(model, adapter) if spec is not None else {}
    # A quantized router (`quantize_routers`) is linear-like: a [out, in] weight, maybe no bias.
    biases = [b for b in (getattr(l, "bias", None) for l in linears.values()) if b is not None]
    skip = {id(linear.weight) for linear in linears.values()} | {id(b) for b in biases}
    seen, other = set(), 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel()
    if spec is None:
        weights = sum(p.numel() for p in model.parameters())
        return ModelCost(16.0, weights * OTHER_BITS // 8, 0, weights, 16.0)
    packed = sum(linear_packed_bytes(*l.weight.shape, spec, getattr(l, "bias", None) is not None)
                 for l in linears.values())
    bias_bytes = sum(b.numel() * 2 for b in biases)
    weights = sum(l.weight.numel() for l in linears.values())
    bits = (packed - bias_bytes) * 8 / weights
    nominal = spec.bits + ((SCALE_BITS + spec.bits) / spec.group_size if spec.group_size else 0.0)
    return ModelCost(bits, packed + other * OTHER_BITS // 8, weights, other, nominal)


__all__ = ["ModelCost", "linear_packed_bytes", "model_cost", "packed_words", "quantized_linears"]
