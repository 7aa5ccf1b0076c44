"""QuaRot (rotation): Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
NeurIPS 2024; reference code spcl/QuaRot (`fake_quant/`).

An orthogonal change of basis of the residual stream and of a few internal activations that
leaves the model's function unchanged but spreads outlier channels over all channels, so
that per-token activation quantization (and weight quantization) loses much less. As the
reference's `rotation_utils.fuse_layer_norms` + `rotate_model` and its online hooks:

- RMSNorm weights fused into the following linears (final norm into the head), head untied
  from the embeddings; transforms computed in float64 and cast back;
- residual stream rotated by a random Hadamard matrix of the hidden size (the reference's
  default `--rotate_mode hadamard`): embeddings `E Q`, readers `W Q`, writers `Q^T W`;
- per-head Hadamard on the value projection's outputs, absorbed by the output projection;
- online Hadamard of the intermediate size at the down projection's input (`W <- W H`
  offline, `x <- x H` in a forward pre-hook registered here, so it runs before the
  activation quantizers that `ptqcore.pipeline.install_act_quant` adds after quantization);
- then GPTQ, the reference's default weight quantizer (`quarot` alone = `quarot+gptq`, with the
  reference's `act_order` off; its `--w_rtn` is `quarot+rtn` here). GPTQ is calibrated with
  full-precision (rotated) activations and activations are quantized per token at inference, as
  the reference.

Deviations, one line each:
- no online Hadamard across heads at the output projection's input (the reference's
  `online_partial_had`); the output projection only absorbs the per-head Hadamard;
- no K-cache / V-cache quantization and hence no Q/K rotation after RoPE;
- the activation quantizer's clip ratio (reference `--a_clip_ratio`, 0.9 in its README runs)
  and weight clip search (`--w_clip`) come from the pipeline's specs (default: none);
- random Hadamard is `H diag(s) / sqrt(n)` (reference `diag(s) H / sqrt(n)`), signs from a
  `torch.Generator` seeded with `seed`; non-power-of-two orders come from Paley constructions
  (`ptqcore.transforms.hadamard`), not the reference's hardcoded matrices (e.g. had172);
- down_proj's activations are quantized at the pipeline's activation bits (the reference
  can keep them at 8 bits with `--int8_down_proj`).
- Mixtures of experts: the router and shared-expert gate are rotated with the residual stream
  (they read it); every expert's down projection gets its own online Hadamard. Without a
  per-head value -> output map (DeepSeek's multi-head latent attention: `value_out` None) the
  per-head rotation is skipped and the state says why.
- Mamba: residual stream rotated and an online Hadamard at out_proj's input (its only residual
  writer, handled as the MLP output projection); no per-head rotation (no attention) and x_proj /
  dt_proj inputs left unrotated, each with the adapter's reason in the state (`Adapter.notes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib import BlockContext
from ..transforms.hadamard import hadamard_transform, random_signs
from ..transforms.rotation import (
    add_online_hadamard, fuse_norms, has_online_hadamard, head_dim, hidden_size, mlp_out_writers, rotate_heads,
    rotate_mlp_out_input, rotate_residual, untie_lm_head,
)
from .base import Method, MethodConfig, MethodInfo


@dataclass(frozen=True)
class QuaRotConfig(MethodConfig):
    seed: int = 0  # signs of the random Hadamard rotation of the residual stream
    rotate_heads: bool = True  # per-head Hadamard across v_proj / o_proj
    online_down: bool = True  # online Hadamard at the down projection's input

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuaRot seed must be a non-negative integer, got {self.seed!r}")
        for knob in ("rotate_heads", "online_down"):
            if not isinstance(getattr(self, knob), bool):
                raise ValueError(f"QuaRot {knob} must be true or false, got {getattr(self, knob)!r}")


class QuaRot(Method):
    info = MethodInfo(
        "quarot", "rotation", "Ashkboos et al., QuaRot, NeurIPS 2024", "transform",
        needs_calibration=False, default_quantizer="gptq", quantizer_defaults=(("act_order", False),),
    )
    Config = QuaRotConfig

    def __init__(self, config: QuaRotConfig):
        super().__init__(config)
        self.hooks: list = []  # handles of the online Hadamard hooks (`.remove()` undoes only the hook)

    @torch.no_grad()
    def prepare(self, model, adapter) -> dict:
        cfg = self.config
        if adapter.rotation_refusal:
            raise ValueError(f"QuaRot on {adapter.name}: {adapter.rotation_refusal}")
        if has_online_hadamard(model, adapter):
            raise ValueError("QuaRot: this model is already rotated (it has online Hadamard hooks)")
        hidden = hidden_size(model, adapter)
        signs = random_signs(hidden, cfg.seed)
        untied = untie_lm_head(model, adapter)
        fuse_norms(model, adapter)
        # x @ Q for Q = random_hadamard(hidden, seed), without forming Q
        rotate_residual(model, adapter, lambda x: hadamard_transform(x) * signs.to(x.device))
        state = {"seed": cfg.seed, "hidden_size": hidden, "untied_lm_head": untied}
        if cfg.rotate_heads and adapter.value_out is None:
            state["rotate_heads"] = "skipped: " + adapter.note(
                "rotate_heads", f"adapter {adapter.name} has no per-head value -> output map (value_out): DeepSeek's "
                "multi-head latent attention packs keys and values in one projection; OLMoE's clip_qkv clamps the values")
        elif cfg.rotate_heads:
            size = head_dim(model)
            rotate_heads(model, adapter, size)
            state["head_dim"] = size
        if cfg.online_down:
            rotate_mlp_out_input(model, adapter)
            self.hooks = add_online_hadamard(model, adapter)
            block = adapter.get_blocks(model)[0]
            state["online_hadamard"] = {n: block.get_submodule(n).in_features for n in mlp_out_writers(adapter, block)}
        if adapter.note("not_rotated"):  # inputs left in their basis, with the adapter's reason (Mamba)
            state["not_rotated"] = adapter.note("not_rotated")
        return state

    def process_block(self, ctx: BlockContext) -> None:
        return None
