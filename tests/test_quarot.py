"""QuaRot: Hadamard constructions, the equivalence transforms (each alone and together),
pipelines, hook order, and on the real SmolLM2: exactness, outlier reduction, W4A4 error."""

import copy
import math

import pytest
import torch

from ptqcore.methods import METHODS, get_method
from ptqcore.methods.quarot import QuaRot, QuaRotConfig
from ptqcore.models import adapter_for
from ptqcore.pipeline import build_pipeline, quantize_model, validate_pipeline_name
from ptqcore.quant import ActSpec, QuantSpec, fake_quant_act
from ptqcore.transforms.hadamard import (
    hadamard_factors, hadamard_matrix, hadamard_transform, random_hadamard, random_signs,
)
from ptqcore.transforms.rotation import (
    OnlineHadamard, add_online_hadamard, fuse_norms, rotate_heads, rotate_mlp_out_input, rotate_residual,
    untie_lm_head,
)

from conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def max_weight_change(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


# ---------------------------------------------------------------- Hadamard matrices and transform

@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 52, 60, 64, 76, 96, 108, 148, 192, 344, 576, 1536])
def test_hadamard_matrix_is_hadamard(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))


@pytest.mark.parametrize(
    "n, factors", [(64, (1, 64)), (192, (12, 16)), (576, (36, 16)), (1536, (12, 128)), (4096, (1, 4096)),
                   (11008, (344, 32)), (14336, (28, 512)), (13824, (108, 128))],
)
def test_large_orders_factor_and_transform_is_orthogonal(n, factors):
    assert hadamard_factors(n) == factors
    m, _ = factors
    Hm = hadamard_matrix(m)
    assert torch.equal(Hm @ Hm.T, m * torch.eye(m, dtype=Hm.dtype))  # the Paley factor
    x = torch.randn(16, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    assert torch.allclose(y @ y.T, x @ x.T, rtol=0, atol=1e-9 * n)  # the Gram matrix is preserved
    units = torch.zeros(8, n, dtype=torch.float64)
    units[torch.arange(8), torch.arange(8) * (n // 8)] = 1
    rows = hadamard_transform(units) * math.sqrt(n)
    assert torch.allclose(rows.abs(), torch.ones_like(rows), atol=1e-9)  # rows of H are +-1


def test_unsupported_orders_raise_naming_n():
    with pytest.raises(ValueError, match=r"n=92 .*2\^2 \* 23"):
        hadamard_matrix(92)  # 92 = 4 * 23: neither Paley construction reaches it
    with pytest.raises(ValueError, match="n=6"):
        hadamard_factors(6)  # no Hadamard matrix of order 6 exists
    with pytest.raises(ValueError, match="does not divide"):
        hadamard_transform(torch.zeros(2, 10), 4)


@pytest.mark.parametrize("n", [12, 64, 96, 192, 576, 1536])
def test_fast_transform_equals_dense_matmul(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n) / math.sqrt(n), rtol=0, atol=1e-10)
    assert torch.equal(x, before)  # the input is not written
    xf = x.float()  # float32 in, float32 out, same values
    assert hadamard_transform(xf).dtype == torch.float32
    assert torch.allclose(hadamard_transform(xf).double(), hadamard_transform(x), atol=1e-4)
    Q = random_hadamard(n, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=Q.dtype), atol=1e-12)
    assert torch.allclose(x @ Q, hadamard_transform(x) * random_signs(n, 3), atol=1e-10)


def test_per_chunk_transform_and_autograd():
    x = torch.randn(4, 64, dtype=torch.float64)
    block = torch.kron(torch.eye(4, dtype=torch.float64), hadamard_matrix(16)) / 4
    assert torch.allclose(hadamard_transform(x, 16), x @ block, atol=1e-12)
    xg = x.clone().requires_grad_()
    hadamard_transform(xg, 16).pow(2).sum().backward()  # orthogonal: d|Tx|^2/dx = 2x
    assert torch.allclose(xg.grad, 2 * x, atol=1e-10)


# ---------------------------------------------------------------- equivalence transforms, tiny Llama

def _random_orthogonal(n, seed=0):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diag(r))


STEPS = {
    "untie": lambda m, a: untie_lm_head(m, a),
    "fuse_norms": lambda m, a: fuse_norms(m, a),
    "rotate_residual_orthogonal": lambda m, a: (fuse_norms(m, a), rotate_residual(m, a, _random_orthogonal(64))),
    "rotate_residual_hadamard": lambda m, a: (fuse_norms(m, a), rotate_residual(m, a, random_hadamard(64, 0))),
    "rotate_heads": lambda m, a: rotate_heads(m, a),
    "online_down": lambda m, a: (rotate_mlp_out_input(m, a), add_online_hadamard(m, a)),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_each_step_alone_keeps_the_logits(step):
    ref_model = make_tiny_llama()
    model = make_tiny_llama()
    adapter = adapter_for(model)
    STEPS[step](model, adapter)
    assert rel_err(logits(model), logits(ref_model)) < 1e-5
    if step != "untie":
        assert max_weight_change(model, ref_model) > 1e-2  # the step did change weights


def test_untie_and_fuse_details():
    model = make_tiny_llama()
    adapter = adapter_for(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fuse_norms(model, adapter)  # unties before folding the final norm into the head
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name
    assert untie_lm_head(model, adapter) is False  # idempotent


def test_broken_variants_change_the_logits():
    """The checks above can fail: the same transforms done wrong do move the logits."""
    ref = logits(make_tiny_llama())
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="fuse_norms first"):
        rotate_residual(model, adapter_for(model), random_hadamard(64, 0))  # norms still have weights
    model = make_tiny_llama()
    rotate_heads(model, adapter_for(model), size=32)  # across two heads: mixes GQA key-value heads
    assert rel_err(logits(model), ref) > 1e-2
    model = make_tiny_llama()
    rotate_mlp_out_input(model, adapter_for(model))  # weight rotated, no online hook
    assert rel_err(logits(model), ref) > 1e-2


def test_full_rotation_keeps_the_logits_of_tiny_llama():
    ref = logits(make_tiny_llama())
    model = make_tiny_llama()
    method = get_method("quarot")
    state = method.prepare(model, adapter_for(model))
    assert state == {"seed": 0, "hidden_size": 64, "untied_lm_head": True, "head_dim": 16,
                     "online_hadamard": {"mlp.down_proj": 96}}  # 96 = 12 * 8: not a power of two
    assert rel_err(logits(model), ref) < 1e-5
    assert len(method.hooks) == 2
    with pytest.raises(ValueError, match="already rotated"):
        method.prepare(model, adapter_for(model))


@pytest.mark.parametrize("knobs", [{"rotate_heads": False}, {"online_down": False}])
def test_knobs_off_still_exact(knobs):
    ref = logits(make_tiny_llama())
    model = make_tiny_llama()
    method = get_method("quarot", **knobs)
    state = method.prepare(model, adapter_for(model))
    assert ("head_dim" in state) == knobs.get("rotate_heads", True)
    assert ("online_hadamard" in state) == knobs.get("online_down", True)
    hooks = model.model.layers[0].mlp.down_proj._forward_pre_hooks.values()
    assert any(isinstance(h, OnlineHadamard) for h in hooks) == knobs.get("online_down", True)
    assert rel_err(logits(model), ref) < 1e-5


def test_determinism_per_seed():
    models = [make_tiny_llama() for _ in range(3)]
    for model, seed in zip(models, (0, 0, 1)):
        get_method("quarot", seed=seed).prepare(model, adapter_for(model))
    assert max_weight_change(models[0], models[1]) == 0
    assert max_weight_change(models[0], models[2]) > 1e-2


def test_config_and_registry():
    assert METHODS["quarot"] is QuaRot
    info = QuaRot.info
    assert (info.name, info.strategy, info.kind, info.needs_calibration, info.default_quantizer) == (
        "quarot", "rotation", "transform", False, "gptq")
    assert QuaRotConfig.knobs() == ["seed", "rotate_heads", "online_down"]
    assert QuaRotConfig(seed=2).to_dict()["seed"] == 2
    for bad in ({"seed": -1}, {"seed": True}, {"seed": "0"}, {"rotate_heads": "yes"}, {"online_down": 1}):
        with pytest.raises(ValueError, match="QuaRot"):
            QuaRotConfig(**bad)
    assert validate_pipeline_name("quarot") == ["quarot", "gptq"]  # the reference's default
    assert validate_pipeline_name("quarot+rtn") == ["quarot", "rtn"]
    assert validate_pipeline_name("quarot+gptq") == ["quarot", "gptq"]
    with pytest.raises(ValueError, match="comes after quantizer"):
        validate_pipeline_name("gptq+quarot")


# ---------------------------------------------------------------- pipelines

@pytest.mark.parametrize("name", ["quarot+rtn", "quarot+gptq"])
@pytest.mark.parametrize("act", [None, ActSpec(4)])
def test_pipelines_run_end_to_end(name, act):
    model = make_tiny_llama()
    adapter = adapter_for(model)
    pipeline = build_pipeline(name, QuantSpec(4), {"quarot.seed": 1})
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    result = quantize_model(model, adapter, pipeline, calib, act, progress=False)
    assert pipeline.step_names == name.split("+")
    assert result.prepared["quarot"]["seed"] == 1
    assert len(result.act_hooks) == (14 if act else 0)
    assert 0 < result.weight_rel_change < 0.5
    assert torch.isfinite(logits(model)).all()


def test_quarot_rtn_is_prepare_then_rtn():
    a, b = make_tiny_llama(), make_tiny_llama()
    quantize_model(a, adapter_for(a), build_pipeline("quarot+rtn", QuantSpec(4)), None, ActSpec(4), progress=False)
    QuaRot(QuaRotConfig()).prepare(b, adapter_for(b))
    quantize_model(b, adapter_for(b), build_pipeline("rtn", QuantSpec(4)), None, ActSpec(4), progress=False)
    assert torch.equal(logits(a), logits(b))


def test_online_hadamard_runs_before_the_act_quantizer():
    model = make_tiny_llama()
    adapter = adapter_for(model)
    quantize_model(model, adapter, build_pipeline("quarot+rtn", QuantSpec(8)), None, ActSpec(4), progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(next(iter(down._forward_pre_hooks.values())), OnlineHadamard)
    raw, seen = [], []
    down.register_forward_pre_hook(lambda mod, args: raw.append(args[0]), prepend=True)  # before every hook
    down.register_forward_hook(lambda mod, args, out: seen.append(args[0]))  # what the linear computed with
    logits(model)
    expected = fake_quant_act(hadamard_transform(raw[0]), ActSpec(4))
    assert torch.allclose(seen[0], expected, atol=1e-6)
    x = seen[0]
    levels = torch.unique((x / (x.abs().amax(-1, keepdim=True) / 7)).round(), dim=None)
    assert len(levels) <= 15  # quantized last: at most 15 levels per token (symmetric 4-bit)
    assert not torch.allclose(seen[0], hadamard_transform(fake_quant_act(raw[0], ActSpec(4))), atol=1e-3)


# ---------------------------------------------------------------- the real SmolLM2-135M

@pytest.fixture(scope="module")
def wiki_windows(smollm2):
    from ptqcore import data

    return data.calibration_windows(data.tokenize_split("wiki", "train", smollm2.tokenizer), 4, 128, 0)


@pytest.fixture(scope="module")
def rotated_smollm2(smollm2):
    """A rotated copy (the session's `smollm2` is shared and stays untouched)."""
    model = copy.deepcopy(smollm2.model)
    state = QuaRot(QuaRotConfig()).prepare(model, smollm2.adapter)
    yield model, state
    del model


def test_smollm2_rotation_keeps_the_logits(smollm2, rotated_smollm2, wiki_windows):
    model, state = rotated_smollm2
    assert state["hidden_size"] == 576 and state["head_dim"] == 64  # 576 = 36 * 16
    assert state["online_hadamard"] == {"mlp.down_proj": 1536}  # 1536 = 12 * 128
    assert state["untied_lm_head"] is True
    ids = wiki_windows[:1, :32]
    err = rel_err(logits(model, ids), logits(smollm2.model, ids))
    print(f"\nSmolLM2 rotation: relative logit error {err:.2e}")
    assert err < 1e-4


def _outlier_ratio(model, adapter, ids):
    """Mean over tokens and blocks of max|x| / rms(x) at the inputs of q/k/v and of down_proj,
    as the linears receive them (after any online Hadamard)."""
    stats = {"qkv": [], "down": []}
    handles = []
    for block in adapter.get_blocks(model):
        for key, module in (("qkv", block.self_attn.q_proj), ("down", block.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, key=key: stats[key].append(
                    (args[0].abs().amax(-1) / args[0].pow(2).mean(-1).sqrt()).mean().item())))
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sum(values) / len(values) for key, values in stats.items()}


def test_smollm2_rotation_removes_activation_outliers(smollm2, rotated_smollm2, wiki_windows):
    ids = wiki_windows[:, :64]
    before = _outlier_ratio(smollm2.model, smollm2.adapter, ids)
    after = _outlier_ratio(rotated_smollm2[0], smollm2.adapter, ids)
    print(f"\nSmolLM2 max|x|/rms(x) per token: before {before}, after {after}")
    for key in ("qkv", "down"):
        assert after[key] < 0.35 * before[key], key
        assert after[key] < 5  # a Gaussian-like vector of 576 / 1536 entries: about 3-4


def test_smollm2_w4a4_quarot_beats_rtn(smollm2, rotated_smollm2, wiki_windows):
    """Activation outliers are what break plain W4A4; after rotation RTN W4A4 does much better.
    `quarot+rtn` = QuaRot's prepare then RTN (test_quarot_rtn_is_prepare_then_rtn), so the
    rotated copy is quantized with the `rtn` pipeline instead of rotating again.

    Logit error: KL(fp || quantized) of the next-token distributions (mean over tokens), top-1
    agreement, and the relative L2 error of the logits (dominated by the W4 per-channel weight
    error, which rotation does not reduce, so it separates the two less)."""
    ids = wiki_windows[:, :64]
    ref = logits(smollm2.model, ids)
    errors = {}
    for name, source in (("rtn", smollm2.model), ("quarot+rtn", rotated_smollm2[0])):
        model = copy.deepcopy(source)
        result = quantize_model(model, smollm2.adapter, build_pipeline("rtn", QuantSpec(4)), None, ActSpec(4),
                                progress=False)
        out = logits(model, ids)
        kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        top1 = (out.argmax(-1) == ref.argmax(-1)).double().mean().item()
        errors[name] = {"kl": round(kl, 3), "top1": round(top1, 3), "rel": round(rel_err(out, ref), 3)}
        for handle in result.act_hooks:
            handle.remove()
        del model
    print(f"\nSmolLM2 w4a4 (4 x 64 wiki tokens) vs fp: {errors}")
    assert errors["quarot+rtn"]["kl"] < 0.6 * errors["rtn"]["kl"]
    assert errors["quarot+rtn"]["top1"] > errors["rtn"]["top1"] + 0.1
    assert errors["quarot+rtn"]["rel"] < errors["rtn"]["rel"]
