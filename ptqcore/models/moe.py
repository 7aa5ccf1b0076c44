"""Mixtures of experts as data: per-expert linears over transformers' fused expert tensors, and
the adapters of Mixtral, Qwen2-MoE and DeepSeek-V3 (shared + routed experts), Qwen3-MoE, OLMoE.

transformers 5 stores a layer's experts as two 3D parameters, `gate_up_proj` [E, 2I, H] (gate
rows, then up rows) and `down_proj` [E, H, I], and computes them in one kernel. PTQ treats each
expert's slices as matrices of their own, calibrated on the tokens routed to that expert, so
`expose_experts` replaces such a container by `UnfusedExperts`: one `ExpertMLP` (gate_proj,
up_proj, down_proj, the container's activation) per expert, called in the reference's eager
order on exactly the tokens the router chose for it, scaled by the routing weight and summed
with `index_add_`. The function is the same up to float rounding (row slices of one matmul).
`fuse_experts` writes the per-expert weights back into the original fused module (for
`save_pretrained`).

Routers (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, ...) hold a bare `weight` [E, H]; they get
`in_features` / `out_features` attributes so that code reading a linear's shape reads theirs
(they are quantized only with `quantize_routers`).

Adapters (built from the config: the number of experts is data):

- attention as the llama adapter (q/k/v after `input_layernorm`, o after v);
- `moe_in`: every expert's gate/up (and the shared expert's) after `post_attention_layernorm`,
  one part per expert (its own tokens, its own Hessian), the router and shared-expert gate as
  readers, judged by the whole MoE block (`mlp`), whose input is the group's input;
- one `expert{e}_out` group per expert (down after up, judged by that down projection) and
  `shared_out` for the shared expert, all of stage `moe_out` (one pass collects their inputs);
- residual writers: o_proj and every down projection;
- blocks without experts (DeepSeek-V3's first blocks, Qwen-MoE's `mlp_only_layers`) get the
  llama MLP groups (`Adapter.dense_groups`, chosen per block by `Adapter.for_block`).

Covered: `mixtral`, `qwen2_moe` (shared expert + sigmoid gate), `deepseek_v3` (multi-head latent
attention, shared experts, group-limited sigmoid router), `qwen3_moe` and `olmoe` (q/k norms).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter, LinearGroup

_ATTN = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj"),
)


class SkipExpert(Exception):
    """Raised by a forward pre-hook on a linear of an `UnfusedExperts` expert to end that expert's
    computation there: the expert adds nothing to the output. Calibration passes that only collect
    expert inputs raise it (`BlockContext` in calib.py), so they skip the expert matmuls."""


class ExpertMLP(nn.Module):
    """One expert: `down(act(gate(x)) * up(x))` with plain linears."""

    ORDER = ("gate_proj", "up_proj", "down_proj")  # the order `forward` calls them

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype=None, device=None):
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """A fused experts container as a list of `ExpertMLP`s, with the container's call signature
    `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`."""

    def __init__(self, experts: list[ExpertMLP], fused_class: type, fused_config):
        super().__init__(experts)
        self._fused = (fused_class, fused_config)  # to rebuild the fused module (`fuse_experts`)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> UnfusedExperts:
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        if getattr(fused, "is_transposed", False) or not getattr(fused, "is_concatenated", True) \
                or getattr(fused, "has_bias", False) or not getattr(fused, "has_gate", True):
            raise ValueError(f"{type(fused).__name__}: only concatenated [gate; up] expert weights without bias "
                             "are supported")
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        experts = []
        for e in range(n):
            mlp = ExpertMLP(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
            mlp.gate_proj.weight.data = gate_up[e, :inter].clone()
            mlp.up_proj.weight.data = gate_up[e, inter:].clone()
            mlp.down_proj.weight.data = down[e].clone()
            experts.append(mlp)
        return cls(experts, type(fused), getattr(fused, "config", None))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        slots = top_k_index.t()  # [k, T]: the reference's order (slot, then token)
        for e, expert in enumerate(self):
            pos, tok = torch.where(slots == e)
            if tok.numel() == 0:
                continue
            try:
                y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            except SkipExpert:  # a calibration pass had what it needed from this expert
                continue
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The transformers module with these weights (gate rows, then up rows)."""
        cls, config = self._fused
        module = cls(config)
        first = self[0].gate_proj.weight
        module.gate_up_proj.data = torch.stack(
            [torch.cat([e.gate_proj.weight.data, e.up_proj.weight.data]) for e in self]).to(first)
        module.down_proj.data = torch.stack([e.down_proj.weight.data for e in self]).to(first)
        return module


def routed_expert(block: nn.Module, name: str) -> str | None:
    """The path of the `ExpertMLP` holding linear `name` (relative to `block`) when that expert is
    one of an `UnfusedExperts` container's; else None (dense linears, shared experts, routers)."""
    expert, _, linear = name.rpartition(".")
    container = expert.rpartition(".")[0]
    if not container or linear not in ExpertMLP.ORDER:
        return None
    try:
        return expert if isinstance(block.get_submodule(container), UnfusedExperts) else None
    except AttributeError:
        return None


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def expose_experts(block: nn.Module, experts: tuple[str, ...], routers: tuple[str, ...] = ()) -> None:
    """Replace each fused experts container of `block` by `UnfusedExperts` (idempotent) and give
    the routers nn.Linear's shape attributes."""
    for path in experts:
        try:
            module = block.get_submodule(path)
        except AttributeError:  # a dense block (DeepSeek-V3's first blocks)
            continue
        if not isinstance(module, UnfusedExperts):
            _set_module(block, path, UnfusedExperts.from_fused(module))
    for path in routers:
        try:
            router = block.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(router, nn.Linear):
            router.out_features, router.in_features = router.weight.shape


@torch.no_grad()
def fuse_experts(model: nn.Module, adapter: Adapter) -> None:
    """Put the fused transformers modules back (e.g. before `save_pretrained`); exact."""
    for block in model.get_submodule(adapter.blocks):
        for path in adapter.experts:
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, UnfusedExperts):
                _set_module(block, path, module.fused())


def _moe_groups(n_experts: int, shared: str | None, routers: tuple[str, ...], attn=_ATTN) -> tuple[LinearGroup, ...]:
    expert = [f"mlp.experts.{e}" for e in range(n_experts)]
    parts = [(f"{x}.gate_proj", f"{x}.up_proj") for x in expert]
    outs = [LinearGroup(f"expert{e}_out", (f"{x}.down_proj",), f"{x}.up_proj", f"{x}.down_proj", stage="moe_out")
            for e, x in enumerate(expert)]
    if shared:  # the shared expert's path
        parts.insert(0, (f"{shared}.gate_proj", f"{shared}.up_proj"))
        outs.insert(0, LinearGroup("shared_out", (f"{shared}.down_proj",), f"{shared}.up_proj",
                                   f"{shared}.down_proj", stage="moe_out"))
    moe_in = LinearGroup(
        "moe_in", tuple(name for part in parts for name in part), "post_attention_layernorm", "mlp",
        readers=routers, parts=tuple(parts), input_at="mlp",
    )
    return (*attn, moe_in, *outs)


def _writers(groups: tuple[LinearGroup, ...]) -> tuple[str, ...]:
    return ("self_attn.o_proj", *(g.linears[0] for g in groups if g.linears[0].endswith("down_proj")))


def mixtral_adapter(config) -> Adapter:
    groups = _moe_groups(config.num_local_experts, None, ("mlp.gate",))
    return Adapter(
        name="mixtral", model_types=("mixtral",), blocks="model.layers", base="model",
        embeddings=("model.embed_tokens",), final_norm="model.norm", lm_head="lm_head", groups=groups,
        residual_writers=_writers(groups), value_out=("self_attn.v_proj", "self_attn.o_proj"),
        query_key=("self_attn.q_proj", "self_attn.k_proj"), experts=("mlp.experts",), routers=("mlp.gate",),
    )


def qwen2_moe_adapter(config) -> Adapter:
    routers = ("mlp.gate", "mlp.shared_expert_gate")
    groups = _moe_groups(config.num_experts, "mlp.shared_expert", routers)
    dense, dense_writers = _sparse_blocks(config)
    return Adapter(
        name="qwen2_moe", model_types=("qwen2_moe",), blocks="model.layers", base="model",
        embeddings=("model.embed_tokens",), final_norm="model.norm", lm_head="lm_head", groups=groups,
        residual_writers=_writers(groups), value_out=("self_attn.v_proj", "self_attn.o_proj"),
        query_key=("self_attn.q_proj", "self_attn.k_proj"), experts=("mlp.experts",), routers=routers,
        dense_groups=dense, dense_residual_writers=dense_writers,
    )


def deepseek_v3_adapter(config) -> Adapter:
    """DeepSeek-V3: multi-head latent attention, `first_k_dense_replace` dense blocks, then MoE
    blocks with shared experts (no shared gate) and a sigmoid, group-limited router.

    Attention groups: the residual readers (q_a_proj or q_proj, kv_a_proj_with_mqa) after
    `input_layernorm`; q_b_proj after `q_a_layernorm` and kv_b_proj after `kv_a_layernorm`
    (norms inside the attention: `internal_norms`, not part of the residual stream); o_proj. The
    latent attention packs each head's key and value rows in kv_b_proj, so there is no per-head
    value -> output map (`value_out` None): no v -> o scale (AWQ skips it, naming the shapes), no
    per-head rotation (QuaRot skips it), no v/o or q/k LET (OmniQuant: norm LET only)."""
    q_in = ("self_attn.q_a_proj",) if config.q_lora_rank is not None else ("self_attn.q_proj",)
    attn = [LinearGroup("attn_in", (*q_in, "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "self_attn")]
    internal = ["self_attn.kv_a_layernorm"]
    if config.q_lora_rank is not None:
        attn.append(LinearGroup("q_b", ("self_attn.q_b_proj",), "self_attn.q_a_layernorm", "self_attn.q_b_proj"))
        internal.insert(0, "self_attn.q_a_layernorm")
    attn.append(LinearGroup("kv_b", ("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"))
    attn.append(LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.kv_b_proj", "self_attn.o_proj"))
    attn = tuple(attn)
    groups = _moe_groups(config.n_routed_experts, "mlp.shared_experts", ("mlp.gate",), attn)
    dense = (*attn, LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
             LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"))
    return Adapter(
        name="deepseek_v3", model_types=("deepseek_v3",), blocks="model.layers", base="model",
        embeddings=("model.embed_tokens",), final_norm="model.norm", lm_head="lm_head", groups=groups,
        residual_writers=_writers(groups), value_out=None, query_key=None, experts=("mlp.experts",),
        routers=("mlp.gate",), attn_out="self_attn.o_proj", internal_norms=tuple(internal),
        dense_groups=dense if config.first_k_dense_replace else (),
        dense_residual_writers=("self_attn.o_proj", "mlp.down_proj") if config.first_k_dense_replace else (),
    )


def _sparse_blocks(config) -> tuple[tuple[LinearGroup, ...], tuple[str, ...]]:
    """Dense groups and writers for the blocks `mlp_only_layers` / `decoder_sparse_step` leave
    dense (each block is matched by whether it has experts: `Adapter.for_block`)."""
    dense = [i for i in range(config.num_hidden_layers)
             if i in (getattr(config, "mlp_only_layers", None) or []) or (i + 1) % getattr(config, "decoder_sparse_step", 1)]
    if not dense:
        return (), ()
    groups = (*_ATTN, LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
              LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"))
    return groups, ("self_attn.o_proj", "mlp.down_proj")


def qwen3_moe_adapter(config) -> Adapter:
    """Qwen3-MoE: Mixtral's shape, with per-head q/k norms (no q/k LET) and optional dense blocks."""
    groups = _moe_groups(config.num_experts, None, ("mlp.gate",))
    dense, dense_writers = _sparse_blocks(config)
    return Adapter(
        name="qwen3_moe", model_types=("qwen3_moe",), blocks="model.layers", base="model",
        embeddings=("model.embed_tokens",), final_norm="model.norm", lm_head="lm_head", groups=groups,
        residual_writers=_writers(groups), value_out=("self_attn.v_proj", "self_attn.o_proj"),
        query_key=("self_attn.q_proj", "self_attn.k_proj"), query_key_norm=True, experts=("mlp.experts",),
        routers=("mlp.gate",), dense_groups=dense, dense_residual_writers=dense_writers,
    )


def olmoe_adapter(config) -> Adapter:
    """OLMoE: Mixtral's shape with q/k norms over the whole projection (no q/k LET). With
    `clip_qkv` the values are clamped after v_proj, so nothing may rescale or rotate v's outputs:
    no v -> o fold (attn_out has no `prev`) and no per-head rotation (`value_out` None)."""
    groups = _moe_groups(config.num_experts, None, ("mlp.gate",))
    clipped = getattr(config, "clip_qkv", None) is not None
    if clipped:
        groups = tuple(LinearGroup("attn_out", ("self_attn.o_proj",), None, "self_attn.o_proj")
                       if g.name == "attn_out" else g for g in groups)
    return Adapter(
        name="olmoe", model_types=("olmoe",), blocks="model.layers", base="model",
        embeddings=("model.embed_tokens",), final_norm="model.norm", lm_head="lm_head", groups=groups,
        residual_writers=_writers(groups), value_out=None if clipped else ("self_attn.v_proj", "self_attn.o_proj"),
        query_key=("self_attn.q_proj", "self_attn.k_proj"), query_key_norm=True, experts=("mlp.experts",),
        routers=("mlp.gate",), attn_out="self_attn.o_proj",
    )


# name -> (model types, builder from the config)
MOE_ADAPTERS = {
    "mixtral": (("mixtral",), mixtral_adapter),
    "qwen2_moe": (("qwen2_moe",), qwen2_moe_adapter),
    "deepseek_v3": (("deepseek_v3",), deepseek_v3_adapter),
    "qwen3_moe": (("qwen3_moe",), qwen3_moe_adapter),
    "olmoe": (("olmoe",), olmoe_adapter),
}
