"""Architecture knowledge as data (the llmc pattern).

An `Adapter` says where a model keeps its blocks, embeddings, final norm and head, and, per
block, the groups of linears that read the same input, the op that precedes each group (a
norm or a linear a per-channel scale can fold into) and the module whose output to inspect
when judging that group's quantization error. Methods read this; they never branch on
model classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input, quantized together."""

    name: str
    linears: tuple[str, ...]  # module paths relative to the block, in true-sequential order
    prev: str | None  # the op whose output feeds the group (a norm or a linear), relative to the block
    inspect: str  # the module whose output measures this group's error


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values it covers
    blocks: str  # path of the ModuleList of blocks, from the causal-LM model
    base: str  # path of the base model (embeddings -> blocks -> final norm), from the causal-LM model
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str
    groups: tuple[LinearGroup, ...]
    # Linears whose outputs are added to the residual stream (rotations act on their output side).
    residual_writers: tuple[str, ...] = ()
    # The value projection and the attention output projection (per-head transforms between them).
    value_out: tuple[str, str] | None = None
    # The query and key projections (per-head-dim scales between them leave q.k^T unchanged).
    query_key: tuple[str, str] | None = None

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def norm_groups(self) -> list[LinearGroup]:
        """Groups that read the residual stream through a norm (the norm is `group.prev`)."""
        return [g for g in self.groups if g.prev is not None and g.prev not in self.linear_names()]

    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.linear_names()}


LLAMA = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    base="model",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    lm_head="lm_head",
    groups=(
        LinearGroup(
            "attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"
        ),
        LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj"),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
        LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"),
    ),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (LLAMA,)}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter covering `model.config.model_type`, or a clear error listing the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise ValueError(f"no adapter for model type {model_type!r}; supported: {', '.join(supported)}")
