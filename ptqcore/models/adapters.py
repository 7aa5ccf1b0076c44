"""Architecture knowledge as data (the llmc pattern).

An `Adapter` says where a model keeps its blocks, embeddings, final norm and head, and, per
block, the groups of linears that read the same input, the op that precedes each group (a
norm or a linear a per-channel scale can fold into) and the module whose output to inspect
when judging that group's quantization error. Methods read this; they never branch on
model classes.

Mixtures of experts (transformers 5 keeps each layer's experts as fused 3D parameters,
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]) are exposed to methods as
ordinary linears: the first time `get_blocks` is called, every container named in
`Adapter.experts` is replaced by `ptqcore.models.moe.UnfusedExperts`, a module list of
per-expert MLPs (`experts.3.gate_proj`, `experts.3.up_proj`, `experts.3.down_proj`) computing the
same function. Each expert's linears are then called on exactly the tokens the router sends
them, so any hook (Hessians, activation statistics) sees the routed tokens and nothing else.
A group's `parts` say which of its linears see the same tokens (one part per expert), its
`readers` which other modules read the same input and must follow any fold or rotation
(routers, the shared-expert gate: full precision unless `quantize_routers`).

Mamba (`ptqcore.models.mamba`): `get_blocks` exposes each mixer so that its four linears are
called as modules (transformers multiplies dt_proj's weight directly); a group may read a slice
of its `prev` linear's outputs (`prev_rows`: x_proj's dt rows feed dt_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input, quantized together."""

    name: str
    linears: tuple[str, ...]  # module paths relative to the block, in true-sequential order
    prev: str | None  # the op whose output feeds the group (a norm or a linear), relative to the block
    inspect: str  # the module whose output measures this group's error
    # Modules that read the same input but stay in full precision (routers, the shared-expert
    # gate): a scale folded into `prev` or a rotation of the input must reach them too.
    readers: tuple[str, ...] = ()
    # Subsets of `linears` that see the same tokens (one per expert, the shared expert, a
    # quantized router); empty: all linears see the same tokens (dense models).
    parts: tuple[tuple[str, ...], ...] = ()
    # The module whose first input is the group's whole input, when the first linear sees only
    # part of it (an MoE block: each expert sees only its routed tokens); None: `linears[0]`.
    input_at: str | None = None
    # Consecutive groups with the same stage read inputs that none of them changes (one expert's
    # down projection does not feed another's), so their inputs can be collected in one pass.
    stage: str | None = None
    # When `prev` is a linear of which only a slice of output rows [start, end) is this group's
    # input (Mamba: x_proj's first r rows feed dt_proj, its B and C rows go elsewhere): a scale
    # folds into those rows only. None: all of prev's outputs.
    prev_rows: tuple[int, int] | None = None

    def token_sets(self) -> tuple[tuple[str, ...], ...]:
        """The linears grouped by the tokens they see (dense: one set, all of `linears`)."""
        return self.parts or (self.linears,)

    @property
    def input_module(self) -> str:
        """The module whose first input is the group's whole input."""
        return self.input_at or self.linears[0]

    @property
    def fold_targets(self) -> tuple[str, ...]:
        """Every module reading the group's input: the quantized linears, then the readers."""
        return self.linears + self.readers


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
    # Fused expert containers (paths from a block), exposed as per-expert linears on first use.
    experts: tuple[str, ...] = ()
    # Routers and shared-expert gates (paths from a block): readers, full precision by default.
    routers: tuple[str, ...] = ()
    # q and k pass through a norm after their projections (Qwen3-MoE, OLMoE): no per-channel
    # scale between them is exact (OmniQuant's q/k LET is off).
    query_key_norm: bool = False
    # The attention output projection, when `value_out` cannot name it (no per-head v -> o map,
    # e.g. DeepSeek's multi-head latent attention packs keys and values in one projection).
    attn_out: str | None = None
    # Norms inside a sublayer (MLA's q_a_layernorm, kv_a_layernorm): their groups read a latent,
    # not the residual stream, so a rotation of the residual stream must not reach them.
    internal_norms: tuple[str, ...] = ()
    # Blocks without the `experts[0]` container (DeepSeek-V3's first dense blocks) have these
    # groups and residual writers instead (`for_block`).
    dense_groups: tuple[LinearGroup, ...] = ()
    dense_residual_writers: tuple[str, ...] = ()
    # Modules outside the blocks (paths from the model) whose outputs enter the residual stream
    # besides the embeddings (a vision-language projector's last linear): rotated like writers.
    input_writers: tuple[str, ...] = ()
    # Why a rotation of this stack's residual stream cannot be exact (LayerNorm with a mean), if so.
    rotation_refusal: str | None = None
    # (topic, reason) pairs: what a transform cannot do on this architecture and why, for the
    # methods to record in their state instead of failing (Mamba: "rotate_heads", "not_rotated").
    notes: tuple[tuple[str, str], ...] = ()

    def note(self, topic: str, default: str | None = None) -> str | None:
        """The adapter's stated reason for `topic` (see `notes`), or `default`."""
        return dict(self.notes).get(topic, default)

    def for_block(self, block: nn.Module) -> Adapter:
        """The adapter of one block: itself, or its dense variant for a block without experts."""
        if not self.dense_groups:
            return self
        try:
            block.get_submodule(self.experts[0])
            return self
        except AttributeError:
            return replace(self, groups=self.dense_groups, residual_writers=self.dense_residual_writers, experts=(),
                           routers=(), dense_groups=(), dense_residual_writers=())

    def residual_norm_groups(self) -> list[LinearGroup]:
        """Norm groups that read the residual stream (not a sublayer's internal norm)."""
        return [g for g in self.norm_groups() if g.prev not in self.internal_norms]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, nn.ModuleList):  # a single module (a projector) is a stack of one block
            blocks = nn.ModuleList([blocks])
        if self.experts:
            from .moe import expose_experts

            for block in blocks:
                expose_experts(block, self.experts, self.routers)
        return blocks

    def stages(self) -> list[list[LinearGroup]]:
        """The groups in order, consecutive groups of one `stage` together (others alone)."""
        out: list[list[LinearGroup]] = []
        for group in self.groups:
            if out and group.stage is not None and out[-1][-1].stage == group.stage:
                out[-1].append(group)
            else:
                out.append([group])
        return out

    def is_routed(self, name: str) -> bool:
        """Whether linear `name` sees only the tokens a router sends it (an expert's linear)."""
        return any(name.startswith(path + ".") for path in self.experts)

    def with_quantized_routers(self) -> Adapter:
        """The same adapter with routers and shared-expert gates quantized like every other linear
        (each on its own token set: every token)."""
        def quantized(groups):
            out = []
            for group in groups:
                if group.readers:
                    parts = group.token_sets() + tuple((name,) for name in group.readers)
                    group = replace(group, linears=group.linears + group.readers, readers=(), parts=parts)
                out.append(group)
            return tuple(out)

        return replace(self, groups=quantized(self.groups), dense_groups=quantized(self.dense_groups))

    def norm_groups(self) -> list[LinearGroup]:
        """Groups that read the residual stream through a norm (the norm is `group.prev`)."""
        return [g for g in self.groups if g.prev is not None and g.prev not in self.linear_names()]

    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.for_block(block).linear_names()}


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


def _moe_builders() -> dict[str, tuple[tuple[str, ...], Callable]]:
    """Adapters built from the config: mixtures of experts (`moe.py`) and Mamba (`mamba.py`)."""
    from .mamba import MAMBA_ADAPTERS
    from .moe import MOE_ADAPTERS

    return {**MOE_ADAPTERS, **MAMBA_ADAPTERS}


def adapter_for(model: nn.Module, quantize_routers: bool = False) -> Adapter:
    """The adapter covering `model.config.model_type`, or a clear error listing the supported types.

    Mixture-of-experts adapters depend on the config (number of experts, shared expert) and
    are built from it; `quantize_routers` quantizes routers and shared-expert gates too."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    for model_types, build in _moe_builders().values():
        if model_type in model_types:
            adapter = build(config)
            return adapter.with_quantized_routers() if quantize_routers else adapter
    from .llava import LLAVA_TYPES, llava_adapter

    if model_type in LLAVA_TYPES:  # the language model's blocks; `llava.parts` adds the vision side
        return llava_adapter(model)
    supported = sorted([t for a in ADAPTERS.values() for t in a.model_types]
                       + [t for types, _ in _moe_builders().values() for t in types] + list(LLAVA_TYPES))
    raise ValueError(f"no adapter for model type {model_type!r}; supported: {', '.join(supported)}")
