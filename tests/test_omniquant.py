"""OmniQuant: the LWC grid, the LET transform's exactness, training beats RTN, the two streams,
folding, the pipeline end to end, NaN and determinism."""

import copy

import pytest
import torch

from ptqcore.calib import BlockContext, NonFiniteError, _first_tensor, capture_block_inputs, quantize_blockwise
from ptqcore.methods import METHODS, get_method
from ptqcore.methods.omniquant import OmniBlock, OmniQuant, lwc_fake_quant
from ptqcore.models import adapter_for
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import QuantSpec, fake_quant, quantize_weight

from conftest import make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n=32, length=32, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def block0(model, ids):
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids)
    return adapter, adapter.get_blocks(model)[0], hidden, kwargs


def run(block, x, kwargs):
    with torch.no_grad():
        return _first_tensor(block(x, **kwargs))


def omniquant(block, adapter, x, kwargs, spec, index=0, **options):
    """Run OmniQuant's process_block on one block; returns its state."""
    return get_method("omniquant", spec=spec, **options).process_block(BlockContext(index, block, adapter, x, kwargs))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def act_max(block, adapter, x, kwargs):
    """Per-channel max |input| of the linears OmniBlock's LET needs."""
    names = [g.linears[0] for g in adapter.norm_groups()] + [adapter.value_out[1]]
    seen = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)))
        for n in names]
    run(block, x, kwargs)
    for h in handles:
        h.remove()
    return seen


def test_registered_with_its_taxonomy():
    info = METHODS["omniquant"].info
    assert (info.strategy, info.kind, info.needs_calibration) == ("optimization", "quantizer", True)
    m = get_method("omniquant", spec=QuantSpec(3, 128), epochs=2, let_lr=1e-3)
    assert m.config.to_dict()["epochs"] == 2 and m.config.let_lr == 1e-3
    defaults = get_method("omniquant", spec=QuantSpec(4)).config
    assert (defaults.epochs, defaults.lwc_lr, defaults.let_lr, defaults.batch_size, defaults.lwc, defaults.let) == \
        (20, 1e-2, 5e-3, 1, True, True)


@pytest.mark.parametrize("options, message", [
    ({"epochs": -1}, "epochs must be an integer >= 0"),
    ({"epochs": 1.5}, "epochs must be an integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lwc_lr": 0.0}, r"lwc_lr must be in \(0, 1\)"),
    ({"let_lr": 2.0}, r"let_lr must be in \(0, 1\)"),
    ({"lwc": False, "let": False}, "needs lwc or let"),
    ({"lwc": "yes"}, "lwc must be true or false"),
    ({"alpha": 1.5}, "alpha must be in"),
])
def test_config_is_validated(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("omniquant", spec=QuantSpec(3, 128), **options)


def test_mse_clip_search_refused():
    with pytest.raises(ValueError, match="learns its clipping"):
        get_method("omniquant", spec=QuantSpec(3, 128, mse=True))


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(3, 48), QuantSpec(4), QuantSpec(3, 48, sym=True)])
def test_grid_without_clipping_is_rtn(spec):
    """With no clipping logits the LWC quantizer is the project's RTN grid, bit for bit
    (100 columns in groups of 48 leave a partial group of 4)."""
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(1))
    w[3] = 0  # an all-zero row gets [-1, 1]
    w[5] = w[5].abs()  # a positive row: the range still contains 0
    got, scale, zero = lwc_fake_quant(w, spec)
    qw = quantize_weight(w, spec)
    assert torch.equal(got, qw.dequantize())
    assert torch.equal(scale, qw.scale) and torch.equal(zero, qw.zero)


def test_clipping_shrinks_the_range_and_learns_through_ste():
    spec = QuantSpec(3, 48)
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(2), requires_grad=True)
    up = torch.full((8, 3), 4.0, requires_grad=True)
    low = torch.full((8, 3), 4.0, requires_grad=True)
    q, scale, _ = lwc_fake_quant(w, spec, up, low)
    _, rtn_scale, _ = lwc_fake_quant(w.detach(), spec)
    torch.testing.assert_close(scale, rtn_scale * torch.sigmoid(torch.tensor(4.0)))  # 0.982 of the range
    assert not torch.equal(q, lwc_fake_quant(w.detach(), spec)[0])  # init clipping is not the identity
    q.pow(2).sum().backward()
    assert up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0
    assert (w.grad != 0).float().mean() > 0.5  # straight-through: gradients reach the weights


def _perturb_let(omni, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in omni.let.values():
            s.mul_(torch.empty(s.shape).uniform_(0.5, 2.0, generator=g))


def _assert_let_exact(block, adapter, x, kwargs):
    ref = run(block, x, kwargs)
    omni = OmniBlock(block, adapter, QuantSpec(3, 32), lwc=False, let=True, act_max=act_max(block, adapter, x, kwargs))
    assert set(omni.let) == {"attn_in", "mlp_in", "vo", "qk"}
    for name in ("attn_in", "mlp_in", "vo"):  # SmoothQuant init: far from the identity
        assert (omni.let[name] - 1).abs().max() > 0.2
    with torch.no_grad():
        assert rel_err(omni(x, kwargs, quantize=False), ref) < 1e-4
        _perturb_let(omni)  # any scales (q/k and v/o across GQA groups too) keep the block's function
        assert rel_err(omni(x, kwargs, quantize=False), ref) < 1e-4
        assert rel_err(omni(x, kwargs, quantize=True), ref) > 1e-3  # and quantizing is visible


def test_let_at_init_is_exact_on_tiny_llama():
    model = make_tiny_llama()  # 4 query heads, 2 key/value heads: GQA
    adapter, block, x, kwargs = block0(model, windows(n=4))
    _assert_let_exact(block, adapter, x, kwargs)


def test_let_at_init_is_exact_on_smollm2(smollm2):
    model, adapter, tok = smollm2.model, smollm2.adapter, smollm2.tokenizer
    text = "The quick brown fox jumps over the lazy dog. Quantization keeps models small and fast. " * 8
    ids = torch.tensor(tok(text)["input_ids"][:64]).reshape(2, 32)
    index = 5
    with torch.no_grad():
        x = model(ids, output_hidden_states=True).hidden_states[index]
    _, kwargs = capture_block_inputs(model, adapter, ids[:1])
    block = copy.deepcopy(adapter.get_blocks(model)[index])  # the fixture is shared: never touch its blocks
    _assert_let_exact(block, adapter, x, kwargs)


def test_fold_writes_what_training_computed():
    """After folding, the unchanged HF block computes what the functional forward computed,
    and each linear lies on the grid its state records."""
    model = make_tiny_llama()
    adapter, block, x, kwargs = block0(model, windows(n=4))
    spec = QuantSpec(3, 48)
    omni = OmniBlock(block, adapter, spec, lwc=True, let=True, act_max=act_max(block, adapter, x, kwargs))
    _perturb_let(omni)
    with torch.no_grad():
        for p in omni.lwc_parameters():
            p.uniform_(0.0, 4.0)
        expected = omni(x, kwargs, quantize=True)
    state = omni.fold()
    assert rel_err(run(block, x, kwargs), expected) < 1e-5
    for name, linear in adapter.linears(block).items():
        s = state[name]
        assert s["scale"].shape == (linear.out_features, 2) and s["clip_up"].max() < 0.99
        regrid = fake_quant(linear.weight, s["scale"][:, s["g_idx"]], s["zero"][:, s["g_idx"]], spec.maxq)
        torch.testing.assert_close(regrid, linear.weight, rtol=0, atol=1e-6)


def test_without_lwc_let_or_training_it_is_rtn():
    model = make_tiny_llama()
    adapter, block, x, kwargs = block0(model, windows(n=4))
    spec = QuantSpec(3, 48)
    expected = {n: quantize_weight(l.weight.detach(), spec).dequantize() for n, l in adapter.linears(block).items()}
    omniquant(block, adapter, x, kwargs, spec, epochs=0, lwc=False, let=False)
    for name, linear in adapter.linears(block).items():
        assert torch.equal(linear.weight, expected[name])


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(3, 48)])
@pytest.mark.parametrize("let", [True, False])
def test_training_beats_rtn_on_the_block_output(spec, let):
    model = make_tiny_llama()
    adapter, block, x, kwargs = block0(model, windows())
    ref = run(block, x, kwargs)
    rtn_block = copy.deepcopy(block)
    get_method("rtn", spec=spec).process_block(BlockContext(0, rtn_block, adapter, None, {}))
    rtn = (run(rtn_block, x, kwargs) - ref).pow(2).mean().item()
    untrained_block = copy.deepcopy(block)
    omniquant(untrained_block, adapter, x, kwargs, spec, epochs=0, let=let)
    untrained = (run(untrained_block, x, kwargs) - ref).pow(2).mean().item()
    state = omniquant(block, adapter, x, kwargs, spec, epochs=5, let=let)
    omni = (run(block, x, kwargs) - ref).pow(2).mean().item()
    assert len(state["loss"]) == 5 and state["loss"][-1] < state["loss"][0]
    assert omni < 0.98 * rtn and omni < untrained  # LWC alone learns slowly (logits start at 4: sigmoid' = 0.018)
    torch.testing.assert_close(torch.tensor(state["loss"][-1]), torch.tensor(omni), rtol=0.15, atol=0)


def test_fp_stream_is_kept_across_blocks():
    """Block i trains on the quantized path the loop hands over, towards the fp model's output
    of block i on the fp stream (the reference's quant_inps / fp_inps)."""
    ids = windows(n=8)
    model, ref = make_tiny_llama(), make_tiny_llama()
    method = get_method("omniquant", spec=QuantSpec(3, 32), epochs=1)
    seen = {}
    train = method._train

    def spy(ctx, omni, quant_in, fp_out, kwargs):
        seen[ctx.index] = (ctx.inputs.clone(), quant_in.clone(), fp_out.clone())
        return train(ctx, omni, quant_in, fp_out, kwargs)

    method._train = spy
    quantize_blockwise(model, adapter_for(model), method.process_block, ids, progress=False)
    adapter = adapter_for(ref)
    _, kwargs = capture_block_inputs(ref, adapter, ids[:1])
    with torch.no_grad():
        fp_hidden = ref(ids, output_hidden_states=True).hidden_states[1]
    fp_target = run(adapter.get_blocks(ref)[1], fp_hidden, kwargs)
    handed, trained_on, target = seen[1]
    torch.testing.assert_close(trained_on, handed)
    assert rel_err(handed, fp_hidden) > 1e-4  # the quantized path differs from the fp stream
    torch.testing.assert_close(target, fp_target, rtol=1e-5, atol=1e-5)


def test_pipeline_end_to_end_and_beats_rtn():
    ids, test_ids = windows(n=16, length=64), windows(n=4, length=64, seed=1)
    spec = QuantSpec(3, 32)
    ref, model, rtn_model = make_tiny_llama(), make_tiny_llama(), make_tiny_llama()
    pipeline = build_pipeline("omniquant", spec, {"epochs": 3})
    result = quantize_model(model, adapter_for(model), pipeline, ids, progress=False)
    quantize_model(rtn_model, adapter_for(rtn_model), build_pipeline("rtn", spec), None, progress=False)
    with torch.no_grad():
        logits, ref_logits, rtn_logits = (m(test_ids).logits for m in (model, ref, rtn_model))
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).pow(2).mean() < (rtn_logits - ref_logits).pow(2).mean()
    assert result.weight_rel_change > 0  # LET rescales weights (norms absorb it): the change can exceed 1
    for state in result.states:
        assert len(state["omniquant"]["loss"]) == 3
        assert set(state["omniquant"]["let"]) == {"attn_in", "mlp_in", "vo", "qk"}


def test_nan_loss_names_the_block():
    model = make_tiny_llama()
    adapter, block, x, kwargs = block0(model, windows(n=4))
    x = x.clone()
    x[0, 3, 5] = float("nan")
    with pytest.warns(UserWarning, match="no full-precision stream for block 3"), \
            pytest.raises(NonFiniteError, match="OmniQuant loss of block 3"):
        omniquant(block, adapter, x, kwargs, QuantSpec(3, 32), index=3, epochs=1)


def test_basis_transforms_refused():
    model = make_tiny_llama()
    adapter, block, x, kwargs = block0(model, windows(n=2))
    with pytest.raises(ValueError, match="does not combine with a basis transform"):
        method = get_method("omniquant", spec=QuantSpec(3, 32))
        method.process_block(BlockContext(0, block, adapter, x, kwargs, basis=[object()]))


def test_deterministic_and_leaves_the_global_rng_alone():
    ids = windows(n=8)
    models = [make_tiny_llama(), make_tiny_llama()]
    losses = []
    for m in models:
        torch.manual_seed(123)
        rng = torch.get_rng_state()
        method = get_method("omniquant", spec=QuantSpec(3, 32), epochs=2, seed=7)
        assert isinstance(method, OmniQuant)
        states = quantize_blockwise(m, adapter_for(m), method.process_block, ids, progress=False).states
        assert torch.equal(torch.get_rng_state(), rng)
        losses.append([s["loss"] for s in states])
    assert losses[0] == losses[1]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
