"""Offline mixture-of-experts models made from a dense Llama by sparse upcycling
(Komatsuzaki et al., "Sparse Upcycling", ICLR 2023): every expert starts as a copy of the dense
MLP, so the full-precision MoE computes the dense model's function at any top-k, and only the
router decides which tokens each expert sees -- and so what each expert is calibrated on.

Recipes (deterministic; `ptqcore.models.zoo` builds them on first use and caches them):

- `mixtral`: `MixtralForCausalLM`, `n_experts` copies of the MLP, top-k routing whose chosen
  weights are renormalised to sum to one (Mixtral always does), so the output is
  `sum_k w_k MLP(x) = MLP(x)`.
- `qwen2_moe` (DeepSeekMoE style): `Qwen2MoeForCausalLM` with a shared expert every token passes
  and `n_experts` routed experts. The shared-expert gate is zero, so its sigmoid is exactly 1/2
  and the shared expert (the dense MLP) adds `MLP(x) / 2`; each routed expert is the dense MLP
  with its down projection halved (exact in floating point: a power of two), and the chosen
  weights are renormalised (`norm_topk_prob`), so the routed part adds `MLP(x) / 2` too.

The router. For each layer, the MLP's intermediate neurons are clustered (spherical k-means,
seeded, `n_experts` clusters) by their activation magnitudes `|act(gate x) * up x|` on wiki
train tokens; expert e's target on a token is the mean activation magnitude of cluster e,
standardised over the tokens; the router is the ridge least-squares map from the MLP's input
(the post-attention norm's output) to those targets. A token therefore goes to the experts whose
neuron clusters it excites most, and tokens spread unevenly over experts, as in a trained MoE.
Experts remain identical at full precision: the benchmark on these models measures the effect of
routing and per-expert calibration on quantization, not expert specialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RECIPES = ("mixtral", "qwen2_moe")


def _mlp_inputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: the MLP's inputs [T, H] on the token windows `ids` (dense model)."""
    layers = model.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach()))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat([x.reshape(-1, x.shape[-1]) for x in parts]) for parts in seen]


def cluster_neurons(act: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """Spherical k-means of the columns (neurons) of `act` [T, I] by their centred, normalised
    magnitude profiles over tokens; returns the cluster of each neuron [I]. Deterministic
    (k-means++ seeding from a seeded generator; stops when no label changes); an emptied cluster
    is re-seeded with the neuron least similar to its centroid."""
    feats = act.abs().t().float()  # [I, T]
    feats = feats - feats.mean(1, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
    g = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    centers = [feats[torch.randint(n, (1,), generator=g).item()]]
    best = feats @ centers[0]
    for _ in range(1, k):
        dist = (1 - best).clamp(min=0) ** 2
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / n)
        centers.append(feats[torch.multinomial(probs, 1, generator=g).item()])
        best = torch.maximum(best, feats @ centers[-1])
    C = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = feats @ C.t()
        new = sim.argmax(1)
        for c in range(k):
            if not (new == c).any():
                far = sim.gather(1, new[:, None])[:, 0].argmin()
                new[far] = c
        if torch.equal(new, labels):
            break
        labels = new
        C = torch.zeros_like(C).index_add_(0, labels, feats)
        C = C / C.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return labels


def fit_router(x: torch.Tensor, act: torch.Tensor, labels: torch.Tensor, k: int, ridge: float = 1e-2) -> torch.Tensor:
    """Router weight [k, H]: ridge least squares from the MLP inputs `x` [T, H] to the
    standardised mean activation magnitude of each neuron cluster (targets [T, k])."""
    mag = act.abs().double()
    targets = torch.stack([mag[:, labels == c].mean(1) for c in range(k)], 1)
    targets = (targets - targets.mean(0)) / targets.std(0).clamp(min=1e-12)
    X = x.double()
    A = X.t() @ X
    A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    W = torch.linalg.solve(A, X.t() @ targets)  # [H, k]
    return W.t().float().contiguous()


def routers_from_activations(dense: nn.Module, ids: torch.Tensor, n_experts: int, seed: int = 0,
                             progress=None) -> list[torch.Tensor]:
    """One router weight [n_experts, H] per layer (see the module docstring)."""
    inputs = _mlp_inputs(dense, ids)
    routers = []
    for i, (layer, x) in enumerate(zip(dense.model.layers, inputs)):
        mlp = layer.mlp
        with torch.no_grad():
            act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        labels = cluster_neurons(act, n_experts, seed=seed + i)
        routers.append(fit_router(x, act, labels, n_experts))
        if progress is not None:
            progress(i)
    return routers


def routing_histogram(dense: nn.Module, routers: list[torch.Tensor], ids: torch.Tensor, top_k: int) -> list[list[int]]:
    """Per layer, how many tokens of `ids` each expert receives at top-k (a token counts once per
    expert it is routed to), computed from the dense model's MLP inputs (the MoE's are the same)."""
    hist = []
    for router, x in zip(routers, _mlp_inputs(dense, ids)):
        chosen = (x @ router.t()).topk(top_k, dim=-1).indices
        hist.append(torch.bincount(chosen.reshape(-1), minlength=router.shape[0]).tolist())
    return hist


def _common_config(dense_config) -> dict:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "rope_parameters", "initializer_range")
    return {k: getattr(dense_config, k) for k in keys if getattr(dense_config, k, None) is not None}


def _check_dense(dense: nn.Module) -> None:
    c = dense.config
    if c.model_type != "llama" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("upcycling needs a Llama without biases (SmolLM2's layout)")
    if (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) != c.hidden_size // c.num_attention_heads:
        raise ValueError("upcycling needs head_dim = hidden_size / num_attention_heads")


@torch.no_grad()
def upcycle(dense: nn.Module, routers: list[torch.Tensor], recipe: str, top_k: int) -> nn.Module:
    """The MoE model of `recipe` (see the module docstring) with the given per-layer routers."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    if recipe not in RECIPES:
        raise ValueError(f"unknown upcycling recipe {recipe!r}; available: {', '.join(RECIPES)}")
    _check_dense(dense)
    c = dense.config
    n_experts = routers[0].shape[0]
    common = _common_config(c)
    if recipe == "mixtral":
        config = MixtralConfig(**common, intermediate_size=c.intermediate_size, num_local_experts=n_experts,
                               num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None)
        moe = MixtralForCausalLM(config)
    else:
        config = Qwen2MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.intermediate_size,
                                shared_expert_intermediate_size=c.intermediate_size, num_experts=n_experts,
                                num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[], qkv_bias=False, use_sliding_window=False)
        moe = Qwen2MoeForCausalLM(config)
    moe.eval().to(dense.dtype)
    # Everything outside the MLPs is the dense model's (same names); the MLPs become experts.
    # Copied in place (broadcast over experts), so no second full-size copy is ever held.
    targets = dict(moe.named_parameters())
    copied = set()
    for key, value in dense.state_dict().items():
        if ".mlp." not in key and key in targets:
            targets[key].copy_(value)
            copied.add(key)
    for i, (layer, router) in enumerate(zip(dense.model.layers, routers)):
        p = f"model.layers.{i}.mlp"
        mlp = moe.model.layers[i].mlp
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        mlp.gate.weight.copy_(router)
        mlp.experts.gate_up_proj.copy_(torch.cat([gate, up])[None].expand(n_experts, -1, -1))
        mlp.experts.down_proj.copy_((down if recipe == "mixtral" else down * 0.5)[None].expand(n_experts, -1, -1))
        names = ["gate.weight", "experts.gate_up_proj", "experts.down_proj"]
        if recipe == "qwen2_moe":  # the shared expert: the dense MLP, weighed by sigmoid(0) = 1/2
            mlp.shared_expert.gate_proj.weight.copy_(gate)
            mlp.shared_expert.up_proj.weight.copy_(up)
            mlp.shared_expert.down_proj.weight.copy_(down)
            mlp.shared_expert_gate.weight.zero_()
            names += ["shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                      "shared_expert.down_proj.weight", "shared_expert_gate.weight"]
        copied.update(f"{p}.{n}" for n in names)
    if c.tie_word_embeddings:
        moe.tie_weights()
        copied.add("lm_head.weight")
    missing = sorted(set(targets) - copied)
    if missing:
        raise RuntimeError(f"upcycling left weights unset: {missing}")
    moe.config.use_cache = False
    return moe


def model_card(name: str, recipe: str, info: dict) -> str:
    """The card of an upcycled model (markdown), from the build's recorded facts."""
    hist = info["routing_histogram"]
    n = len(hist[0])
    share = [[c / max(1, sum(row)) for c in row] for row in hist]
    flat = [s for row in share for s in row]
    lines = [
        f"# {name}",
        "",
        f"A mixture-of-experts model made from {info['base']} by sparse upcycling (Komatsuzaki et al., 2022), "
        f"built by `ptqcore.models.upcycle` (recipe `{recipe}`) in {info['build_seconds']:.0f} s "
        f"({info['threads']} torch threads).",
        "",
        "**The experts are identical at full precision.** Every expert is a copy of the dense model's MLP, so this "
        "model computes the dense model's function (up to float rounding) at any top-k; what a benchmark measures "
        "on it is the effect of routing and per-expert calibration on quantization, not expert specialisation.",
        "",
        f"- architecture: `{info['architecture']}`, {info['layers']} layers, {n} routed experts per layer, "
        f"top-{info['top_k']}" + (", plus one shared expert" if recipe == "qwen2_moe" else ""),
    ]
    if recipe == "mixtral":
        lines.append("- equality with the dense model: Mixtral renormalises the chosen experts' routing weights "
                     "to sum to one, so `sum_k w_k MLP(x) = MLP(x)`.")
    else:
        lines.append("- equality with the dense model: the shared expert is the dense MLP and its gate "
                     "(`shared_expert_gate`) is zero, so sigmoid(0) = 1/2 weighs it; each routed expert is the dense "
                     "MLP with its down projection halved (exact: a power of two) and the chosen weights sum to one "
                     "(`norm_topk_prob`), so shared + routed = MLP(x)/2 + MLP(x)/2.")
    lines += [
        f"- router: per layer, the MLP's {info['intermediate']} neurons clustered into {n} groups (spherical k-means, "
        f"seed {info['seed']}) by their activation magnitudes on {info['router_tokens']} wiki train tokens "
        f"({info['router_windows']}); each expert's router row is the ridge least-squares map from the MLP input to "
        "its cluster's standardised mean activation magnitude.",
        f"- full-precision check: max |logits(MoE) - logits(dense)| / max |logits(dense)| = "
        f"{info['fp_max_rel_diff']:.2e} on {info['check_tokens']} wiki test tokens.",
        f"- routing histogram ({info['histogram_tokens']} tokens: {info['histogram_windows']}), share of routed "
        f"slots per expert: min {min(flat):.3f}, max {max(flat):.3f} (uniform: {1 / n:.3f}).",
        "",
        "| layer | " + " | ".join(f"e{e}" for e in range(n)) + " |",
        "|---|" + "---|" * n,
    ]
    for i, row in enumerate(hist):
        lines.append(f"| {i} | " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def entropy_ratio(hist: list[list[int]]) -> float:
    """Mean over layers of the routing entropy / log(n_experts) (1: perfectly even)."""
    out = []
    for row in hist:
        total = sum(row)
        p = [c / total for c in row if c]
        out.append(-sum(q * math.log(q) for q in p) / math.log(len(row)))
    return sum(out) / len(out)
