"""Packed export of a weight-only quantized model in the GPTQ checkpoint format.

The format is the one AutoGPTQ introduced and transformers/optimum/gptqmodel load (a
`quantization_config` with `quant_method: gptq` in config.json); per quantized linear
`<name>.qweight`, `<name>.qzeros`, `<name>.scales`, `<name>.g_idx` replace `<name>.weight`:

- `qweight` int32 `[in * bits / 32, out]`: the codes of each output column, input rows packed
  as one little-endian bit stream, value k at bits `[k * bits, (k + 1) * bits)` (for 2/4/8 bits
  that is `32 / bits` codes per word, lowest first; for 3 bits 32 codes per 3 words);
- `qzeros` int32 `[G, out * bits / 32]`: the zero points packed the same way along outputs;
  format `gptq` (v1) stores `zero - 1` (the AutoGPTQ convention, undone by its loaders), which
  cannot represent an asymmetric zero of 0, so when a zero is 0 we write `gptq_v2` (gptqmodel's
  format, zeros as they are) and say so in `checkpoint_format`;
- `scales` float16 `[G, out]`, `g_idx` int32 `[in]` (group of each input column; act-order
  makes it non-monotonic); dequantization is `scales[g_idx] * (q - zero[g_idx])`.

Everything else (embeddings, `lm_head`, norms, biases) is stored in float16 (`dtype`).

Loading it with transformers needs gptqmodel (`transformers.quantizers.quantizer_gptq`
requires it for CPU and GPU); gptqmodel has no wheel on PyPI (sdist only, it compiles
extensions) and is not installed here, so `load_packed` is our own loader: it unpacks every
linear back to float and returns a plain transformers model. The tests check the pack/unpack
round trip bit for bit and that the reloaded model gives the fake-quantized model's logits.

Weight-only methods whose state records the grid per linear (`scale`, `zero`, `g_idx`: rtn,
gptq, awq, smoothquant's weights, omniquant) export; a basis change (QuIP) or a forward hook on a
quantized linear (QuaRot's online Hadamard, activation quantizers) changes what the stored weights
mean, so those are refused (QuaRot with `online_down=false` is a plain model and exports).
`dtype=torch.float32` stores scales and the other tensors in float32 (exact round-trip tests).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .cost import quantized_linears

FORMAT_BITS = (2, 3, 4, 8)
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- packing kernels

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `[n, m]` (values in `[0, 2^bits)`) along dim 0 into int32 words
    `[n * bits / 32, m]`, one little-endian bit stream per column."""
    if bits not in FORMAT_BITS:
        raise ValueError(f"the GPTQ format packs {FORMAT_BITS} bits, got {bits}")
    n, m = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words; need a multiple of "
                         f"{32 // math.gcd(32, bits)}")
    codes = codes.to(torch.int64)
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"codes outside [0, {2**bits - 1}]")
    words = torch.zeros(n * bits // 32, m, dtype=torch.int64, device=codes.device)
    for k in range(n):
        start = k * bits
        word, shift = divmod(start, 32)
        words[word] |= (codes[k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code spills into the next word (3 bits)
            words[word + 1] |= codes[k] >> (32 - shift)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 `[n * bits / 32, m]` -> int64 codes `[n, m]`."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    out = torch.empty(n, w.shape[1], dtype=torch.int64, device=w.device)
    for k in range(n):
        word, shift = divmod(k * bits, 32)
        value = w[word] >> shift
        if shift + bits > 32:
            value = value | (w[word + 1] << (32 - shift))
        out[k] = value & mask
    return out


# --------------------------------------------------------------------------- one linear

def grid_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
               bits: int, layer: str = "weight") -> torch.Tensor:
    """Integer codes of a fake-quantized weight `[out, in]` on its recorded grid; raises when
    the weight is not on that grid (something changed it after quantization)."""
    s, z = scale.float()[:, g_idx], zero.float()[:, g_idx]
    w = weight.float()
    codes = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    if (z != torch.round(z)).any():
        raise ValueError(f"{layer}: zero points are not integers; the GPTQ format stores integer zeros")
    err = (s * (codes - z) - w).abs().max().item()
    if err > 1e-5 * max(w.abs().max().item(), 1e-12):
        raise ValueError(f"{layer}: the weight is not on its recorded grid (max error {err:.3g}); "
                         "a transform after quantization cannot be exported")
    return codes.to(torch.int64)


def pack_linear(weight, scale, zero, g_idx, bits: int, v2: bool, layer: str = "weight",
                scale_dtype: torch.dtype = torch.float16) -> dict:
    """The four GPTQ tensors of one linear (`scale`/`zero` are [out, G], `g_idx` [in]); scales in
    float16 as the format has them (`scale_dtype` float32 only for exact round-trip tests)."""
    codes = grid_codes(weight, scale, zero, g_idx, bits, layer)
    zeros = zero.round().to(torch.int64)
    stored = zeros if v2 else (zeros - 1) & (2**bits - 1)
    return {
        "qweight": pack_codes(codes.t().contiguous(), bits),  # [in * bits / 32, out]
        "qzeros": pack_codes(stored, bits).t().contiguous(),  # zeros [out, G] -> [G, out * bits / 32]
        "scales": scale.t().contiguous().to(scale_dtype),  # [G, out]
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_linear(tensors: dict, bits: int, in_features: int, out_features: int, v2: bool) -> torch.Tensor:
    """Float weight `[out, in]` from the four GPTQ tensors of one linear."""
    codes = unpack_codes(tensors["qweight"], bits, in_features).t()  # [out, in]
    zeros = unpack_codes(tensors["qzeros"].t().contiguous(), bits, out_features)  # [out, G]
    if not v2:
        zeros = (zeros + 1) & (2**bits - 1)
    scales = tensors["scales"].float().t()  # [out, G]
    g_idx = tensors["g_idx"].long()
    return scales[:, g_idx] * (codes - zeros[:, g_idx]).float()


# --------------------------------------------------------------------------- a whole model

def collect_grids(states: list, adapter) -> list[dict[str, dict]]:
    """Per block, {linear name: {scale, zero, g_idx}} from the block loop's states (a plain
    method's or each pipeline step's); raises for a layer with no recorded grid or a basis change."""
    grids = []
    for index, state in enumerate(states):
        found: dict[str, dict] = {}
        candidates = [state] + [v for v in state.values() if isinstance(v, dict)]
        for cand in candidates:
            for name in adapter.linear_names():
                entry = cand.get(name)
                if isinstance(entry, dict) and {"scale", "zero", "g_idx"} <= set(entry):
                    if entry.get("basis"):
                        raise ValueError(f"block {index} {name}: quantized in a changed basis (QuIP); the GPTQ "
                                         "format cannot store the basis change")
                    found[name] = entry
        missing = [n for n in adapter.linear_names() if n not in found]
        if missing:
            raise ValueError(f"block {index}: no recorded grid (scale, zero, g_idx) for {', '.join(missing)}")
        grids.append(found)
    return grids


def quantization_config(spec, method_config: dict | None = None, v2: bool = False) -> dict:
    gptq = (method_config or {}).get("gptq", {})
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size if spec.group_size else -1,
        "sym": spec.sym,
        "desc_act": bool(gptq.get("act_order", False)),
        "static_groups": bool(gptq.get("static_groups", False)),
        "true_sequential": bool(gptq.get("true_sequential", True)),
        "damp_percent": gptq.get("percdamp", 0.01),
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
        "meta": {"quantizer": [f"ptqcore:{__version__}"], "method_config": method_config or {}},
    }


def export_packed(model: nn.Module, adapter, states: list, spec, folder, tokenizer=None,
                  method_config: dict | None = None, dtype: torch.dtype = torch.float16) -> dict:
    """Write `model` (quantized in place by the block loop, whose per-block `states` hold each
    linear's grid) as a GPTQ-format checkpoint into `folder`. Returns {"bytes": size of the
    weights file, "checkpoint_format", "files"}."""
    from safetensors.torch import save_file

    if spec is None or spec.bits not in FORMAT_BITS:
        raise ValueError(f"the GPTQ format stores weight-only settings of {FORMAT_BITS} bits; got "
                         f"{spec.name if spec else 'fp'}")
    grids = collect_grids(states, adapter)
    blocks = adapter.get_blocks(model)
    for name, linear in quantized_linears(model, adapter).items():
        if linear._forward_pre_hooks or linear._forward_hooks:
            raise ValueError(f"{name} runs an online transform or activation quantizer (a forward hook, e.g. QuaRot's "
                             "online Hadamard); the GPTQ format cannot store it")
    if len(grids) != len(blocks):
        raise ValueError(f"{len(grids)} block states for {len(blocks)} blocks")
    names = quantized_linears(model, adapter)
    by_id = {id(m): n for n, m in names.items()}
    v2 = any((entry["zero"].round() == 0).any().item() for grid in grids for entry in grid.values())
    tensors: dict[str, torch.Tensor] = {}
    skip = set()
    for block, grid in zip(blocks, grids):
        for short, linear in adapter.linears(block).items():
            full = by_id[id(linear)]
            g = grid[short]
            packed = pack_linear(linear.weight.data, g["scale"].cpu(), g["zero"].cpu(), g["g_idx"].cpu(),
                                 spec.bits, v2, full, scale_dtype=dtype)
            for key, value in packed.items():
                tensors[f"{full}.{key}"] = value.cpu().contiguous()
            skip.add(f"{full}.weight")
    seen = set()
    for name, p in model.state_dict(keep_vars=True).items():
        if name in skip or id(p) in seen:  # tied weights: stored once, under the first name
            continue
        seen.add(id(p))
        tensors[name] = p.detach().to(dtype).cpu().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(spec, method_config, v2)
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"bytes": os.path.getsize(folder / WEIGHTS_FILE), "checkpoint_format": config["quantization_config"]
            ["checkpoint_format"], "files": sorted(p.name for p in folder.iterdir())}


def load_packed(folder, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our loader for `export_packed` checkpoints: a plain transformers model whose quantized
    linears hold the unpacked (de-quantized) weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qcfg = raw.pop("quantization_config")
    if qcfg.get("quant_method") != "gptq":
        raise ValueError(f"{folder} is not a GPTQ checkpoint")
    bits, v2 = qcfg["bits"], qcfg.get("checkpoint_format", "gptq") == "gptq_v2"
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("torch_dtype", "dtype")})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    state = {}
    for key in tensors:
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            linear = model.get_submodule(base)
            parts = {k: tensors[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            state[f"{base}.weight"] = unpack_linear(parts, bits, linear.in_features, linear.out_features, v2)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = tensors[key]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


__all__ = ["FORMAT_BITS", "collect_grids", "export_packed", "load_packed", "pack_codes", "pack_linear",
           "quantization_config", "unpack_codes", "unpack_linear"]
