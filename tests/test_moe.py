"""Mixtures of experts: fused experts exposed as per-expert linears, per-expert calibration on
routed tokens with a recorded fallback, every method and pipeline on tiny Mixtral and Qwen2-MoE
(DeepSeekMoE-style) models, equivalence transforms exact, and the upcycling recipes."""

import copy
import math

import pytest
import torch

from ptqcore.calib import BlockContext, capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.methods.omniquant import OmniBlock
from ptqcore.models import adapter_for
from ptqcore.models.moe import UnfusedExperts, fuse_experts
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import QuantSpec, quantize_weight

from conftest import fast_pipeline, logits, make_tiny_llama, quantize_and_check, rel_err, token_ids, quip_transform_only

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(4, 32)
METHODS = ["rtn", "gptq", "awq", "smoothquant", "quarot+rtn", "quip", "omniquant"]
PIPELINES = ["quarot+gptq", "quip+gptq", "awq+gptq", "smoothquant+gptq", "awq+omniquant"]


def make_moe(kind: str, seed: int = 0, **overrides):
    """A tiny random Mixtral (4 experts, top-2), Qwen2-MoE (shared expert + 4 routed, top-2) or
    DeepSeek-V3 (multi-head latent attention, a dense first block, then a shared expert + 4
    routed experts in 2 groups, top-2 within the best group)."""
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                              OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_experts_per_tok=2)
    common.update(overrides)
    torch.manual_seed(seed)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4, **common))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=96, num_experts=4, norm_topk_prob=True,
                                                   head_dim=16, **common))
    elif kind == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(intermediate_size=96, num_experts=4, clip_qkv=8.0, **common))
    elif kind == "deepseek_v3":
        common.setdefault("num_hidden_layers", 2)
        common["num_key_value_heads"] = 4
        model = DeepseekV3ForCausalLM(DeepseekV3Config(
            intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1, n_group=2,
            topk_group=1, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, norm_topk_prob=True, routed_scaling_factor=1.0, **common))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(moe_intermediate_size=96, shared_expert_intermediate_size=64,
                                                   num_experts=4, norm_topk_prob=True, **common))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # routing that depends on the token
            if name.endswith("shared_expert_gate.weight"):
                p.normal_(0, 0.1)
    return model


KINDS = ["mixtral", "qwen2_moe", "deepseek_v3", "qwen3_moe", "olmoe"]


def ids(n=4, length=32):
    return token_ids(n, length)


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_experts_compute_the_same_function_and_fuse_back(kind):
    model = make_moe(kind)
    ref = logits(model, ids())
    adapter = adapter_for(model)
    block = adapter.get_blocks(model)[-1]
    assert isinstance(block.mlp.experts, UnfusedExperts) and len(block.mlp.experts) == 4
    assert block.mlp.gate.in_features == 64 and block.mlp.gate.out_features == 4
    assert rel_err(logits(model, ids()), ref) < 1e-6
    names = list(adapter.linears(block))
    assert "mlp.experts.3.gate_proj" in names and "mlp.experts.3.down_proj" in names
    assert "mlp.gate" not in names  # routers stay in full precision by default
    assert ("mlp.shared_expert.down_proj" in names) == (kind == "qwen2_moe")
    fuse_experts(model, adapter)
    assert not isinstance(model.model.layers[-1].mlp.experts, UnfusedExperts)
    assert rel_err(logits(model, ids()), ref) < 1e-6


def test_adapter_data_and_quantized_routers():
    adapter = adapter_for(make_moe("qwen2_moe"))
    moe_in = next(g for g in adapter.groups if g.name == "moe_in")
    assert moe_in.readers == ("mlp.gate", "mlp.shared_expert_gate") and moe_in.input_module == "mlp"
    assert moe_in.token_sets()[1] == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj")
    assert adapter.is_routed("mlp.experts.0.up_proj") and not adapter.is_routed("mlp.shared_expert.up_proj")
    assert [g.name for g in adapter.groups][-5:] == ["shared_out"] + [f"expert{e}_out" for e in range(4)]
    quantized = adapter_for(make_moe("qwen2_moe"), quantize_routers=True)
    assert {"mlp.gate", "mlp.shared_expert_gate"} <= set(quantized.linear_names())
    assert not next(g for g in quantized.groups if g.name == "moe_in").readers
    mixed = make_moe("qwen2_moe", mlp_only_layers=[0])  # a dense first block
    adapter = adapter_for(mixed)
    first, second = adapter.get_blocks(mixed)
    assert set(adapter.linears(first)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert "mlp.experts.0.gate_proj" in adapter.linears(second)


def test_feed_parts_hands_each_expert_its_routed_tokens():
    model = make_moe("mixtral")
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids())
    block = adapter.get_blocks(model)[0]
    ctx = BlockContext(0, block, adapter, hidden, kwargs)
    group = next(g for g in adapter.groups if g.name == "moe_in")
    seen = {}
    counts = ctx.feed_parts(group, lambda i, x: seen.setdefault(i, []).append(x.clone()))
    # the reference: the router's choices on the MoE block's input
    mlp_in = []
    handle = block.mlp.register_forward_pre_hook(lambda mod, args: mlp_in.append(args[0].reshape(-1, 64)))
    ctx.forward()
    handle.remove()
    with torch.no_grad():
        chosen = [block.mlp.gate(x)[2] for x in mlp_in]
    for e in range(4):
        routed = torch.cat([x[torch.where(c.t() == e)[1]] for x, c in zip(mlp_in, chosen)])  # (slot, token) order
        assert counts[e] == routed.shape[0]
        if routed.shape[0]:
            torch.testing.assert_close(torch.cat(seen[e]), routed)
    assert sum(counts) == 2 * 4 * 32  # top-2 of every token


def test_input_passes_skip_the_expert_matmuls():
    """Collecting gate/up inputs runs no expert linear; collecting down inputs (every expert in one
    pass) runs gate and up but not down: the passes only need expert inputs."""
    model = make_moe("qwen2_moe")
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids())
    block = adapter.get_blocks(model)[0]
    ctx = BlockContext(0, block, adapter, hidden, kwargs)
    ran = {}
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda mod, args, out, _n=name: ran.__setitem__(_n, ran.get(_n, 0) + 1))
    moe_in = next(g for g in adapter.groups if g.name == "moe_in")
    counts = ctx.feed_parts(moe_in, lambda i, x: None)
    assert all(counts) and not any(".experts." in name for name in ran)
    assert ran["mlp.shared_expert.down_proj"] == hidden.shape[0]  # the shared expert is not routed: it runs
    ran.clear()
    stage = next(s for s in adapter.stages() if len(s) > 1)
    counts = ctx.feed_stage(stage, lambda gi, si, x: None)
    assert sum(c for group in counts for c in group) > 0
    assert ran.get("mlp.experts.0.gate_proj") and ran.get("mlp.experts.0.up_proj")
    assert not any(name.startswith("mlp.experts.") and name.endswith("down_proj") for name in ran)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["gptq", "quip+rtn"])
def test_skipping_expert_matmuls_changes_no_weight(kind, name, monkeypatch):
    """The skip leaves every statistic as it was: the same weights, bit for bit, as passes that
    compute every expert in full."""
    import ptqcore.calib

    skipped = make_moe(kind)
    quantize_model(skipped, adapter_for(skipped), build_pipeline(name, SPEC), ids(), progress=False)
    full = make_moe(kind)
    monkeypatch.setattr(ptqcore.calib, "routed_expert", lambda block, name: None)
    quantize_model(full, adapter_for(full), build_pipeline(name, SPEC), ids(), progress=False)
    for (n, a), (_, b) in zip(skipped.named_parameters(), full.named_parameters()):
        assert torch.equal(a, b), n


def _never_route_to(model, expert):
    """Hook every router so that `expert` is never chosen (a dead expert)."""
    def hook(mod, args, out):
        router_logits, _, _ = out
        masked = router_logits.clone()
        masked[:, expert] = float("-inf")
        probs = torch.softmax(masked.float(), -1)
        top, idx = probs.topk(mod.top_k, -1)
        return router_logits, top / top.sum(-1, keepdim=True), idx
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["gptq", "awq", "omniquant", "quip", "awq+gptq"])
def test_expert_without_tokens_falls_back_to_rtn_and_is_recorded(name):
    model = make_moe("mixtral")
    _never_route_to(model, 3)
    adapter = adapter_for(model)
    adapter.get_blocks(model)  # expose the experts as linears
    before = {n: w.detach().clone() for n, w in model.named_parameters() if ".experts.3." in n}
    assert len(before) == 2 * 3
    result = quantize_model(model, adapter, fast_pipeline(name, SPEC), ids(), progress=False)
    dead = {f"{b}.mlp.experts.3.{p}" for b in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(result.expert_fallbacks) == dead and set(result.expert_fallbacks.values()) == {0}
    # RTN of the weights the quantizer received: gptq changes nothing before it; awq and omniquant
    # scale every expert's gate/up columns with the joint norm scale but leave a dead expert's down
    # alone; quip's fallback rounds in its rotated basis
    unchanged = {"gptq": ("gate_proj", "up_proj", "down_proj"), "quip": ()}.get(name, ("down_proj",))
    for n, w in before.items():
        if n.endswith(unchanged):
            torch.testing.assert_close(model.get_parameter(n), quantize_weight(w, SPEC).dequantize(), rtol=0, atol=1e-6)
    assert torch.isfinite(logits(model, ids())).all()


def test_min_expert_tokens_threshold():
    model = make_moe("mixtral")
    result = quantize_model(model, adapter_for(model), build_pipeline("gptq", SPEC), ids(), progress=False,
                            min_expert_tokens=10**6)
    assert len(result.expert_fallbacks) == 2 * 4 * 3  # every expert linear of both blocks
    model = make_moe("mixtral")
    result = quantize_model(model, adapter_for(model), build_pipeline("gptq", SPEC), ids(), progress=False,
                            min_expert_tokens=1)
    assert not result.expert_fallbacks


def test_gptq_expert_hessian_uses_routed_tokens_only():
    """GPTQ on expert e equals gptq_quantize with the Hessian of exactly its routed tokens."""
    from ptqcore.methods.gptq import HessianAccumulator, gptq_quantize

    model = make_moe("mixtral")
    adapter = adapter_for(model)
    reference = copy.deepcopy(model)
    quantize_model(model, adapter, build_pipeline("gptq", SPEC), ids(), progress=False)
    # block 0's attention first, as GPTQ (true-sequential) does, then collect expert 1's inputs
    ref_adapter = adapter_for(reference)
    hidden, kwargs = capture_block_inputs(reference, ref_adapter, ids())
    block = ref_adapter.get_blocks(reference)[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        block.get_submodule(name).weight.data = model.model.layers[0].get_submodule(name).weight.data.clone()
    acc = HessianAccumulator(64)
    handle = block.mlp.experts[1].gate_proj.register_forward_pre_hook(lambda mod, args: acc.add_batch(args[0]))
    BlockContext(0, block, ref_adapter, hidden, kwargs).forward()
    handle.remove()
    W = torch.cat([block.mlp.experts[1].gate_proj.weight, block.mlp.experts[1].up_proj.weight])
    expected = gptq_quantize(W, acc.H, SPEC, act_order=True).weight
    got = torch.cat([model.model.layers[0].mlp.experts[1].gate_proj.weight, model.model.layers[0].mlp.experts[1].up_proj.weight])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS + PIPELINES)
def test_every_method_and_pipeline_runs(kind, name):
    model = make_moe(kind)
    quantize_and_check(model, adapter_for(model), name, SPEC, ids())


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_routers_flag(kind):
    model = make_moe(kind)
    adapter = adapter_for(model, quantize_routers=True)
    gate = model.model.layers[-1].mlp.gate.weight.detach().clone()
    quantize_model(model, adapter, build_pipeline("gptq", SPEC), ids(), progress=False)
    assert not torch.equal(model.model.layers[-1].mlp.gate.weight, gate)
    model = make_moe(kind)
    quantize_model(model, adapter_for(model), build_pipeline("gptq", SPEC), ids(), progress=False)
    assert torch.equal(model.model.layers[-1].mlp.gate.weight, gate)  # default: full precision


# --- equivalence transforms keep the logits (float32, < 1e-4 relative) ----------------------

def _transform_only(model, method, tokens, **knobs):
    step = get_method(method, spec=SPEC, **knobs)
    adapter = adapter_for(model)
    step.prepare(model, adapter)
    return quantize_blockwise(model, adapter, step.process_block, tokens, progress=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, knobs", [("awq", {"clip": False}), ("smoothquant", {}), ("quarot", {})])
def test_equivalence_transforms_keep_the_logits(kind, method, knobs):
    model = make_moe(kind)
    ref = logits(model, ids())
    before = model.model.layers[-1].mlp.gate.weight.detach().clone()
    result = _transform_only(model, method, ids(), **knobs)
    assert rel_err(logits(model, ids()), ref) < 1e-4
    assert not torch.allclose(model.model.layers[-1].mlp.gate.weight, before)  # the router followed the transform
    if method == "awq":
        assert {"moe_in", "expert0_out"} <= set(result.states[-1]["scales"])


@pytest.mark.parametrize("kind", KINDS)
def test_quip_without_quantization_keeps_the_logits(kind):
    model = make_moe(kind)
    ref = logits(model, ids())
    identity_quantizer = quip_transform_only()

    adapter = adapter_for(model)
    quantize_blockwise(model, adapter, identity_quantizer, ids(), progress=False)
    assert rel_err(logits(model, ids()), ref) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_omniquant_let_at_init_is_exact(kind):
    model = make_moe(kind)
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids())
    block0 = adapter.get_blocks(model)[0]
    with torch.no_grad():
        hidden = torch.cat([block0(x, **kwargs) for x in hidden.split(1)])  # the inputs of the last (MoE) block
    block = adapter.get_blocks(model)[1]
    ctx = BlockContext(1, block, adapter.for_block(block), hidden, kwargs)
    ref = ctx.forward()
    omni_method = get_method("omniquant", spec=SPEC)
    watch = [g.input_module for g in ctx.adapter.norm_groups()]
    watch += [ctx.adapter.value_out[1]] if ctx.adapter.value_out else []
    _, act_max, _ = omni_method._fp_pass(ctx, hidden, kwargs, watch)
    omni = OmniBlock(block, ctx.adapter, SPEC, lwc=True, let=True, act_max=act_max)
    expected = {"mixtral": {"attn_in", "moe_in", "vo", "qk"}, "qwen2_moe": {"attn_in", "moe_in", "vo", "qk"},
                "deepseek_v3": {"attn_in", "q_b", "kv_b", "moe_in"},
                "qwen3_moe": {"attn_in", "moe_in", "vo"}, "olmoe": {"attn_in", "moe_in"}}[kind]  # q/k norms; clip_qkv
    assert expected == set(omni.let)
    with torch.no_grad():
        out = torch.cat([omni(x, kwargs, quantize=False) for x in hidden.split(1)])
        assert rel_err(out, ref) < 1e-4
        quantized = torch.cat([omni(x, kwargs, quantize=True) for x in hidden.split(1)])
        assert rel_err(quantized, ref) > 1e-3


def test_awq_searches_one_scale_per_norm_jointly():
    model = make_moe("mixtral")
    result = _transform_only(model, "awq", ids(), clip=False)
    state = result.states[0]["scales"]["moe_in"]
    assert state["scales"].shape == (64,) and state["prev"] == "post_attention_layernorm"
    assert len(state["linears"]) == 2 * 4  # every expert's gate and up, one scale


# --- upcycling recipes --------------------------------------------------------------------

def _tiny_dense(seed=0):
    return make_tiny_llama(seed=seed, vocab_size=256)


@pytest.mark.parametrize("recipe, n_experts", [("mixtral", 4), ("qwen2_moe", 6)])
def test_upcycled_model_reproduces_the_dense_logits_at_any_top_k(recipe, n_experts):
    from ptqcore.models import upcycle as up

    dense = _tiny_dense()
    calib = token_ids(4, 64)
    routers = up.routers_from_activations(dense, calib, n_experts)
    assert len(routers) == 2 and routers[0].shape == (n_experts, 64)
    ref = logits(dense, ids())
    for top_k in range(1, n_experts + 1):
        moe = up.upcycle(dense, routers, recipe, top_k)
        assert rel_err(logits(moe, ids()), ref) < 1e-5, top_k
    hist = up.routing_histogram(dense, routers, ids(), 2)
    assert sum(hist[0]) == 2 * 4 * 32
    assert max(hist[0]) > min(hist[0])  # uneven


def test_upcycling_is_deterministic_and_clusters_by_activation():
    from ptqcore.models import upcycle as up

    dense = _tiny_dense()
    calib = token_ids(4, 64)
    a = up.routers_from_activations(dense, calib, 4)
    b = up.routers_from_activations(dense, calib, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # two planted groups of neurons that fire on disjoint halves of the tokens are separated
    t = torch.arange(200)
    act = torch.zeros(200, 12)
    act[t < 100, :6] = torch.rand(100, 6, generator=torch.Generator().manual_seed(0)) + 1
    act[t >= 100, 6:] = torch.rand(100, 6, generator=torch.Generator().manual_seed(1)) + 1
    labels = up.cluster_neurons(act, 2)
    assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:].tolist())) == 1 and labels[0] != labels[6]


def test_build_upcycled_writes_a_card(tmp_path, smollm2):
    """The recipe end to end at a tiny size: a tiny dense Llama with SmolLM2's tokenizer."""
    import json

    from ptqcore.models.zoo import build_upcycled

    dense = make_tiny_llama(vocab_size=len(smollm2.tokenizer))
    out = tmp_path / "moe"
    out.mkdir()
    info = build_upcycled(out, "tiny-moe", dense, smollm2.tokenizer, "qwen2_moe", 4, 2, "a tiny random Llama",
                          router_windows=(2, 64, 1), histogram_windows=(2, 64, 0), check_tokens=64, progress=False)
    assert info["fp_max_rel_diff"] < 1e-5 and sum(info["routing_histogram"][0]) == 2 * 2 * 64
    card = (out / "README.md").read_text()
    assert "experts are identical at full precision" in card and "| layer |" in card
    assert json.loads((out / "build.json").read_text())["build_seconds"] > 0
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = token_ids(1, 16, vocab=1000)
    assert rel_err(logits(loaded, tokens), logits(dense, tokens)) < 1e-5


@pytest.mark.parametrize("name", ["quarot+gptq", "smoothquant+rtn"])
def test_weight_activation_settings_hook_every_expert(name):
    from ptqcore.quant import ActSpec

    model = make_moe("qwen2_moe")
    adapter = adapter_for(model)
    result = quantize_model(model, adapter, build_pipeline(name, SPEC), ids(), ActSpec(8), progress=False)
    assert len(result.act_hooks) == 2 * len(adapter.linear_names())  # q/k/v/o, shared and every expert
    assert torch.isfinite(logits(model, ids())).all()


def test_runner_records_expert_fallbacks_in_notes(tmp_path, smollm2):
    from ptqcore.runner import RunSpec, run

    folder = tmp_path / "tiny-mixtral"
    make_moe("mixtral", vocab_size=len(smollm2.tokenizer)).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    spec = RunSpec(str(folder), "gptq", SPEC, nsamples=2, calib_seqlen=16, eval_seqlen=64, limit=1)
    rows = run(spec, out=str(tmp_path / "results"), progress=False, log=lambda *a: None)
    assert "expert linears fell back to RTN" in rows[0]["notes"]  # 2 x 16 tokens: some expert saw < 32
    assert all(r["value"] == r["value"] for r in rows)  # not NaN


def test_deepseek_v3_blocks_differ_and_latent_attention_is_stated():
    model = make_moe("deepseek_v3")
    adapter = adapter_for(model)
    dense, moe = adapter.get_blocks(model)
    assert [g.name for g in adapter.for_block(dense).groups] == ["attn_in", "q_b", "kv_b", "attn_out", "mlp_in", "mlp_out"]
    assert "moe_in" in [g.name for g in adapter.for_block(moe).groups]
    assert [g.name for g in adapter.residual_norm_groups()] == ["attn_in", "moe_in"]  # not the latent norms
    state = get_method("quarot").prepare(model, adapter)
    assert state["rotate_heads"].startswith("skipped") and "latent" in state["rotate_heads"]
    assert set(state["online_hadamard"]) == {"mlp.down_proj"}  # block 0 is dense
    awq = _transform_only(make_moe("deepseek_v3"), "awq", ids(), clip=False)
    assert "kv_b_proj" in awq.states[0]["skipped"]["attn_out"]  # keys and values packed: no v -> o scale


def test_runner_moe_flags(tmp_path, smollm2):
    """`--quantize-routers` and `--min-expert-tokens` through the runner on a tiny Mixtral
    checkpoint: defaults keep the config hash; a minimum above every expert's share sends all
    experts to RTN and the run's notes count them; routers stay full precision unless asked."""
    from ptqcore.results import ResultsStore, config_hash
    from ptqcore.runner import RunSpec, run

    ckpt = tmp_path / "tiny-mixtral"
    make_moe("mixtral", vocab_size=len(smollm2.tokenizer)).save_pretrained(ckpt)
    smollm2.tokenizer.save_pretrained(ckpt)

    base = dict(model=str(ckpt), method="rtn", spec=QuantSpec(4, 32), datasets=("wiki",), limit=1, eval_seqlen=64)
    default = RunSpec(**base)
    assert "moe" not in default.config()
    assert config_hash(RunSpec(**base, min_expert_tokens=32).config()) == config_hash(default.config())
    assert RunSpec(**base, quantize_routers=True).config()["moe"] == {"quantize_routers": True}
    with pytest.raises(ValueError, match="min expert tokens must be an integer >= 0"):
        RunSpec(**base, min_expert_tokens=-1).validate()
    with pytest.raises(ValueError, match="method fp quantizes nothing"):
        RunSpec(str(ckpt), quantize_routers=True).validate()

    spec = RunSpec(**{**base, "method": "gptq"}, nsamples=2, calib_seqlen=64, min_expert_tokens=10**6,
                   quantize_routers=True)
    rows = run(spec, out=str(tmp_path / "res"), progress=False, log=lambda *a: None)
    assert rows and all(math.isfinite(r["value"]) for r in rows)
    assert "24 expert linears fell back to RTN" in rows[0]["notes"]  # 2 blocks x 4 experts x gate, up, down
    assert ResultsStore(tmp_path / "res").has(config_hash(spec.config()))
