"""Methods composed in memory: `quarot+gptq`, `awq+gptq`, `smoothquant+rtn`, ...

A pipeline is an ordered list of method steps sharing one weight spec. Equivalence-preserving
transforms come first, at most one lossy weight quantizer, last; a pipeline that ends with a
transform gets that transform's default quantizer (AWQ and SmoothQuant round with RTN after
scaling, as their reference code does). Invalid chains are refused before any model is loaded.

`quantize_model` runs every step's `prepare` (whole-model transforms) in order, then one block
loop in which each block goes through every step's `process_block` in order, then installs the
activation fake-quantizers of a weight-activation setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calib import MIN_EXPERT_TOKENS, BlockwiseResult, quantize_blockwise
from .methods import FP, METHODS, Method, method_names
from .models.adapters import Adapter
from .quant import ActSpec, QuantSpec, fake_quant_act


@dataclass
class Pipeline:
    name: str  # as the user wrote it, e.g. "awq+gptq"
    steps: list[Method]

    @property
    def needs_calibration(self) -> bool:
        return any(step.info.needs_calibration for step in self.steps)

    @property
    def step_names(self) -> list[str]:
        return [step.info.name for step in self.steps]

    def config(self) -> dict:
        """Every step's full config, in order (what the results rows record)."""
        return {step.info.name: step.config.to_dict() for step in self.steps}


def split_pipeline(name: str) -> list[str]:
    return [part.strip().lower() for part in name.split("+")]


def validate_pipeline_name(name: str) -> list[str]:
    """The step names of a valid pipeline (default quantizer appended), or ValueError."""
    parts = split_pipeline(name)
    if parts == [FP.name]:
        return []
    for part in parts:
        if part == FP.name:
            raise ValueError(f"'fp' cannot be part of a pipeline ({name!r}); it means no quantization")
        if part not in METHODS:
            raise ValueError(f"unknown method {part!r}; available: {', '.join(method_names())}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"pipeline {name!r} repeats a step")
    kinds = [METHODS[p].info.kind for p in parts]
    quantizers = [p for p, k in zip(parts, kinds) if k == "quantizer"]
    if len(quantizers) > 1:
        raise ValueError(
            f"pipeline {name!r} has {len(quantizers)} lossy quantizers ({', '.join(quantizers)}); "
            "at most one, as the last step"
        )
    if quantizers and kinds[-1] != "quantizer":
        late = parts[kinds.index("quantizer") + 1]
        raise ValueError(
            f"pipeline {name!r}: transform {late!r} comes after quantizer {quantizers[0]!r}; "
            "equivalence transforms go first, the quantizer last"
        )
    if not quantizers:
        default = METHODS[parts[-1]].info.default_quantizer
        if default is None:
            raise ValueError(f"pipeline {name!r} has no quantizer; end it with one, e.g. {name}+rtn or {name}+gptq")
        parts.append(default)
    basis = [p for p in parts if METHODS[p].info.sets_basis]
    if basis and not METHODS[parts[-1]].info.accepts_basis:
        able = sorted(n for n, cls in METHODS.items() if cls.info.accepts_basis)
        raise ValueError(
            f"pipeline {name!r}: {basis[0]} changes each layer's basis, which {parts[-1]} does not support; "
            f"use one of: {', '.join(able)}"
        )
    return parts


def canonical_name(name: str) -> str:
    """The shortest name of what a pipeline computes: a trailing quantizer that is the last
    transform's default is dropped (`quarot+gptq` -> `quarot`, `awq+rtn` -> `awq`,
    `quip+gptq` -> `quip`), so names that run the same steps share one results-store key."""
    parts = validate_pipeline_name(name)
    if not parts:
        return FP.name
    if len(parts) > 1 and METHODS[parts[-2]].info.default_quantizer == parts[-1]:
        parts = parts[:-1]
    return "+".join(parts)


def _split_options(parts: list[str], options: dict) -> dict[str, dict]:
    """Options as `knob=value` (given to every step that has the knob) or `step.knob=value`."""
    per_step: dict[str, dict] = {p: {} for p in parts}
    for key, value in options.items():
        if "." in key:
            step, knob = key.split(".", 1)
            if step not in per_step:
                raise ValueError(f"option {key!r} names step {step!r}, not in the pipeline ({'+'.join(parts)})")
            targets = [step]
        else:
            knob = key
            targets = [p for p in parts if knob in METHODS[p].Config.knobs()]
            if not targets:
                known = sorted({k for p in parts for k in METHODS[p].Config.knobs()})
                raise ValueError(f"no step of {'+'.join(parts)} has option {knob!r}; options: {', '.join(known)}")
        for target in targets:
            per_step[target][knob] = value
    return per_step


def build_pipeline(
    name: str, spec: QuantSpec | None, options: dict | None = None, defaults: dict | None = None
) -> Pipeline:
    """Validate and instantiate. `options` map knob names (or `step.knob`) to values;
    `defaults` ({method: {knob: value}}, a profile's) apply where `options` leave a knob unset."""
    from .methods import get_method

    parts = validate_pipeline_name(name)
    if not parts:
        raise ValueError("method 'fp' quantizes nothing; there is no pipeline for it")
    per_step = _split_options(parts, options or {})
    for part in parts:
        for knob, value in (defaults or {}).get(part, {}).items():
            per_step[part].setdefault(knob, value)
    quantizer = parts[-1]
    for part in parts[:-1]:
        for knob, value in METHODS[part].info.quantizer_defaults:
            if knob in METHODS[quantizer].Config.knobs():
                per_step[quantizer].setdefault(knob, value)
    return Pipeline(name, [get_method(p, spec=spec, **per_step[p]) for p in parts])


@torch.no_grad()
def install_act_quant(model: nn.Module, adapter: Adapter, act: ActSpec) -> list:
    """Per-token dynamic fake quantization of the input of every quantized linear.
    Returns the hook handles (call `.remove()` to undo)."""
    handles = []
    for block in adapter.get_blocks(model):
        for linear in adapter.linears(block).values():
            handles.append(linear.register_forward_pre_hook(lambda mod, args, _a=act: (fake_quant_act(args[0], _a),)))
    return handles


def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    pipeline: Pipeline,
    calib_ids: torch.Tensor | None,
    act: ActSpec | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str | None = None,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
) -> BlockwiseResult:
    """Apply the pipeline to `model` in place. Mixture-of-experts models: experts routed fewer
    than `min_expert_tokens` calibration tokens fall back to RTN (`result.expert_fallbacks`)."""
    prepared = {step.info.name: step.prepare(model, adapter) for step in pipeline.steps}

    def process_block(ctx):
        return {step.info.name: step.process_block(ctx) for step in pipeline.steps}

    result = quantize_blockwise(
        model, adapter, process_block, calib_ids if pipeline.needs_calibration else None, batch_size,
        desc=desc or pipeline.name, progress=progress, min_expert_tokens=min_expert_tokens,
    )
    result.prepared = prepared
    if act is not None:
        result.act_hooks = install_act_quant(model, adapter, act)
    return result
