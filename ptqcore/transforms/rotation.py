"""QuaRot's equivalence transforms, read from the adapter (no model-class branching).

Each function changes the model in place and leaves its outputs unchanged (up to rounding):

1. `fuse_norms`: each RMSNorm's weight goes into the linears of the group it precedes
   (`adapter.norm_groups()`, norm = `group.prev`), the final norm's into the head; the norm
   weights become ones. An RMSNorm with unit weight commutes with any orthogonal Q.
2. `untie_lm_head`: the head gets its own copy of a tied embedding matrix.
3. `rotate_residual`: the residual stream is multiplied by an orthogonal Q: embeddings
   `E <- E Q`, readers of the residual (norm-group linears, head) `W <- W Q`, residual
   writers `W <- Q^T W`, `b <- Q^T b`.
4. `rotate_heads`: the per-head Hadamard between the value projection (output rows, per
   key-value head) and the attention output projection (input columns, per query head).
5. `rotate_mlp_out_input` + `add_online_hadamard`: the MLP's output projection absorbs the
   normalised Hadamard `W <- W H` and a forward pre-hook applies `x <- x H` to its input.

Weights are transformed in float64 and cast back to their dtype. Mixtures of experts: a
norm's readers include the router and shared-expert gate (`group.readers`), and every expert's
down projection is a residual writer with its own online Hadamard (it runs on routed tokens).
Blocks may differ (`Adapter.for_block`: DeepSeek-V3's dense first blocks), and norms inside a
sublayer (`Adapter.internal_norms`: MLA's latent norms) are neither fused nor rotated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.adapters import Adapter
from .hadamard import hadamard_factors, hadamard_transform

__all__ = [
    "OnlineHadamard", "add_online_hadamard", "fuse_norms", "has_online_hadamard", "head_dim", "hidden_size",
    "mlp_out_writers", "rotate_heads", "rotate_mlp_out_input", "rotate_residual", "untie_lm_head",
]


def hidden_size(model: nn.Module, adapter: Adapter) -> int:
    return model.get_submodule(adapter.embeddings[0]).weight.shape[1]


def head_dim(model: nn.Module) -> int:
    config = model.config.get_text_config()  # a vision-language config: its language model's
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mlp_out_writers(adapter: Adapter, block: nn.Module | None = None) -> list[str]:
    """Residual writers other than the attention output projection (Llama: `mlp.down_proj`), of
    `block` when the adapter's blocks differ (dense and MoE blocks of DeepSeek-V3)."""
    if block is not None:
        adapter = adapter.for_block(block)
    attn_out = adapter.attn_out or (adapter.value_out[1] if adapter.value_out else None)
    return [name for name in adapter.residual_writers if name != attn_out]


_CHUNK = 1 << 21  # elements per float64 chunk: keeps the work in cache on a busy machine


def _map_rows(param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor], columns: bool = False) -> None:
    """`param <- fn(param)` row by row (`columns`: `param <- fn(param^T)^T`), computed in
    float64 on chunks of rows and written back in the parameter's dtype."""
    W = param.data.t() if columns else param.data
    if W.dim() == 1:
        param.data = fn(W.double()).to(param.dtype)
        return
    step = max(1, _CHUNK // W.shape[1])
    for start in range(0, W.shape[0], step):
        W[start : start + step] = fn(W[start : start + step].double()).to(W.dtype)


def untie_lm_head(model: nn.Module, adapter: Adapter) -> bool:
    """Give the head its own weight if it shares one with an embedding; True if it did."""
    head = model.get_submodule(adapter.lm_head)
    tied = any(
        model.get_submodule(path).weight.data_ptr() == head.weight.data_ptr() for path in adapter.embeddings
    )
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config = getattr(model, "config", None)
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False  # so a later `tie_weights()` does not re-tie them
    return tied


def _norm_and_readers(model: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """Every norm in front of the residual readers with the linears it feeds (shared norms merged)."""
    pairs: dict[int, tuple[nn.Module, list[nn.Linear]]] = {}
    for block in adapter.get_blocks(model):
        for group in adapter.for_block(block).residual_norm_groups():
            norm = block.get_submodule(group.prev)
            pairs.setdefault(id(norm), (norm, []))[1].extend(block.get_submodule(n) for n in group.fold_targets)
    final = model.get_submodule(adapter.final_norm)
    pairs[id(final)] = (final, [model.get_submodule(adapter.lm_head)])
    return list(pairs.values())


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: Adapter) -> None:
    """Fold each norm's weight into the linears it feeds (`W <- W diag(g)`), then set it to ones."""
    untie_lm_head(model, adapter)
    for norm, linears in _norm_and_readers(model, adapter):
        if getattr(norm, "bias", None) is not None:
            raise ValueError(
                f"norm {type(norm).__name__} has a bias (a LayerNorm?): rotating needs RMSNorm-style norms"
            )
        g = norm.weight.detach()
        for linear in linears:
            if linear.weight.dtype == g.dtype == torch.float32:
                linear.weight.mul_(g)  # one correctly rounded product: identical to float64 then cast
            else:
                linear.weight.data = (linear.weight.double() * g.double()).to(linear.weight.dtype)
        norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_residual(
    model: nn.Module, adapter: Adapter, Q: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Multiply the residual stream by an orthogonal Q (norms must be fused first).

    `Q` is a [hidden, hidden] matrix or a function computing `x @ Q` on the last dim of a
    float64 tensor (e.g. a fast random Hadamard; QuaRot passes one).
    """
    untie_lm_head(model, adapter)
    if isinstance(Q, torch.Tensor):
        matrix = Q.to(torch.float64)
        Q = lambda x: x @ matrix.to(x.device)  # noqa: E731
    for norm, _ in _norm_and_readers(model, adapter):
        if not torch.all(norm.weight == 1):
            raise ValueError("rotate_residual needs unit norm weights: call fuse_norms first")
    # Weights whose rows live in the residual space: embeddings (E <- E Q) and readers (W <- W Q).
    rows_in_residual = [model.get_submodule(path) for path in adapter.embeddings]
    rows_in_residual += [linear for _, linears in _norm_and_readers(model, adapter) for linear in linears]
    for module in rows_in_residual:
        _map_rows(module.weight, Q)
    writers = [block.get_submodule(name) for block in adapter.get_blocks(model)
               for name in adapter.for_block(block).residual_writers]
    writers += [model.get_submodule(path) for path in adapter.input_writers]  # e.g. a VLM's projector
    for linear in writers:  # W <- Q^T W = (W^T Q)^T, b <- Q^T b
        _map_rows(linear.weight, Q, columns=True)
        if linear.bias is not None:
            _map_rows(linear.bias, Q)


@torch.no_grad()
def rotate_heads(model: nn.Module, adapter: Adapter, size: int | None = None) -> None:
    """Per-head Hadamard across the value and output projections: each value head's output
    `v_h <- v_h H` (rows of v_proj; GQA: every key-value head), the output projection's input
    columns `W_o <- W_o (I (x) H)` (every query head). The same H on every head keeps it exact."""
    if adapter.value_out is None:
        raise ValueError(f"adapter {adapter.name} names no value/output projections (value_out)")
    size = size or head_dim(model)
    v_name, o_name = adapter.value_out
    for block in adapter.get_blocks(model):
        v, o = block.get_submodule(v_name), block.get_submodule(o_name)
        if v.out_features % size or o.in_features % size:
            raise ValueError(f"head size {size} does not divide {v_name} outputs ({v.out_features}) "
                             f"or {o_name} inputs ({o.in_features})")
        per_head = lambda x: hadamard_transform(x, size)  # noqa: E731
        _map_rows(v.weight, per_head, columns=True)  # W_v <- (I (x) H)^T W_v
        if v.bias is not None:
            _map_rows(v.bias, per_head)
        _map_rows(o.weight, per_head)  # W_o <- W_o (I (x) H)


@torch.no_grad()
def rotate_mlp_out_input(model: nn.Module, adapter: Adapter) -> list[str]:
    """`W <- W H` (normalised Hadamard of its input size) on every MLP output projection; exact
    only together with `add_online_hadamard`. Returns the layer names."""
    names = []
    for block in adapter.get_blocks(model):
        for name in mlp_out_writers(adapter, block):
            linear = block.get_submodule(name)
            _map_rows(linear.weight, hadamard_transform)
            names.append(name)
    return sorted(set(names))


class OnlineHadamard:
    """Forward pre-hook: the normalised Hadamard on the last dim of a module's first input."""

    def __init__(self, size: int):
        hadamard_factors(size)  # fail early on an unsupported size
        self.size = size

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0], self.size), *args[1:])

    def __repr__(self) -> str:
        return f"OnlineHadamard({self.size})"


def has_online_hadamard(model: nn.Module, adapter: Adapter) -> bool:
    """Whether any MLP output projection already carries an `OnlineHadamard` hook."""
    return any(
        isinstance(hook, OnlineHadamard)
        for block in adapter.get_blocks(model)
        for name in mlp_out_writers(adapter, block)
        for hook in block.get_submodule(name)._forward_pre_hooks.values()
    )


def add_online_hadamard(model: nn.Module, adapter: Adapter) -> list:
    """Register an `OnlineHadamard` pre-hook on every MLP output projection (after any hooks
    already there, before any added later, e.g. activation quantizers). Returns the handles."""
    if has_online_hadamard(model, adapter):
        raise ValueError("the MLP output projections already have online Hadamard hooks (rotated twice?)")
    handles = []
    for block in adapter.get_blocks(model):
        for name in mlp_out_writers(adapter, block):
            linear = block.get_submodule(name)
            handles.append(linear.register_forward_pre_hook(OnlineHadamard(linear.in_features)))
    return handles
