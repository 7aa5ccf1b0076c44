"""The block-sequential loop on tiny random Llamas: inputs, outputs, GPTQ/RTN end to end, NaN."""

import pytest
import torch

from ptqcore.calib import BlockContext, NonFiniteError, capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.models import adapter_for
from ptqcore.quant import QuantSpec, fake_quant

from conftest import make_tiny_llama


def windows(n=6, length=32, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_captured_inputs_are_the_embeddings(tiny_llama):
    adapter = adapter_for(tiny_llama)
    ids = windows()
    hidden, kwargs = capture_block_inputs(tiny_llama, adapter, ids)
    torch.testing.assert_close(hidden, tiny_llama.model.embed_tokens(ids))
    assert "position_embeddings" in kwargs and "hidden_states" not in kwargs


def test_loop_without_changes_reproduces_the_model(tiny_llama):
    """Feeding each block's outputs forward reproduces the model's own final hidden states."""
    adapter = adapter_for(tiny_llama)
    ids = windows()
    seen = []
    result = quantize_blockwise(tiny_llama, adapter, lambda ctx: seen.append(ctx.inputs.clone()), ids, batch_size=4,
                                progress=False)
    assert result.weight_rel_change == 0.0
    with torch.no_grad():
        states = tiny_llama(ids, output_hidden_states=True).hidden_states
    assert len(seen) == 2
    for i, inputs in enumerate(seen):
        torch.testing.assert_close(inputs, states[i], rtol=1e-5, atol=1e-5)


def test_freed_memory_goes_back_after_unfusing_and_after_each_block(tiny_llama, monkeypatch):
    """The loop trims the heap once after `get_blocks` (MoE unfusing) and once after each block
    has been processed and fed forward, so fragments of one block never pile up under the next."""
    import ptqcore.calib as calib

    events = []
    monkeypatch.setattr(calib, "release_freed_memory", lambda: events.append("release"))
    real_forward = calib.BlockContext.forward
    monkeypatch.setattr(calib.BlockContext, "forward", lambda ctx: events.append("forward") or real_forward(ctx))
    quantize_blockwise(tiny_llama, adapter_for(tiny_llama), lambda ctx: events.append(f"block{ctx.index}"),
                       windows(), progress=False)
    assert events == ["release", "block0", "forward", "release", "block1", "forward", "release"]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_freed_memory_trims_the_glibc_heap():
    from ptqcore.calib import release_freed_memory

    kept = torch.arange(10.0)
    assert release_freed_memory() is True
    assert torch.equal(kept, torch.arange(10.0))


def test_feed_inputs_stops_at_the_group(tiny_llama):
    adapter = adapter_for(tiny_llama)
    ids = windows()
    hidden, kwargs = capture_block_inputs(tiny_llama, adapter, ids)
    block = adapter.get_blocks(tiny_llama)[0]
    ctx = BlockContext(0, block, adapter, hidden, kwargs, batch_size=4)
    got = []
    ctx.feed_inputs(adapter.groups[0], got.append)
    torch.testing.assert_close(torch.cat(got), block.input_layernorm(hidden))
    calls = []
    handle = block.mlp.register_forward_hook(lambda *a: calls.append(1))
    ctx.feed_inputs(adapter.groups[1], lambda x: None)
    handle.remove()
    assert calls == []  # the MLP after o_proj's input was never run


def _layer_error(model, ref, ids):
    with torch.no_grad():
        return (model(ids).logits - ref(ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("options", [{}, {"act_order": False}, {"static_groups": True}, {"true_sequential": False}])
def test_gptq_end_to_end_beats_rtn(options):
    ids = windows(n=16, length=64)
    ref = make_tiny_llama()
    spec = QuantSpec(3, 32)
    gptq_model, rtn_model = make_tiny_llama(), make_tiny_llama()
    states = quantize_blockwise(gptq_model, adapter_for(gptq_model), get_method("gptq", spec=spec, **options).process_block,
                                ids, progress=False).states
    quantize_blockwise(rtn_model, adapter_for(rtn_model), get_method("rtn", spec=spec).process_block, None,
                       progress=False)
    test_ids = windows(n=4, length=64, seed=1)
    assert _layer_error(gptq_model, ref, test_ids) < _layer_error(rtn_model, ref, test_ids)
    # every quantized linear lies on the grid its state records
    adapter = adapter_for(gptq_model)
    for block, state in zip(adapter.get_blocks(gptq_model), states):
        for name, linear in adapter.linears(block).items():
            s = state[name]
            regrid = fake_quant(linear.weight, s["scale"][:, s["g_idx"]], s["zero"][:, s["g_idx"]], spec.maxq)
            torch.testing.assert_close(regrid, linear.weight, rtol=0, atol=1e-5)


def test_gptq_deterministic():
    ids = windows(n=8, length=32)
    models = [make_tiny_llama(), make_tiny_llama()]
    for m in models:
        quantize_blockwise(m, adapter_for(m), get_method("gptq", spec=QuantSpec(3, 32)).process_block, ids,
                           progress=False)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_nan_in_calibration_names_the_block():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="block 1"):
        quantize_blockwise(model, adapter_for(model), get_method("gptq", spec=QuantSpec(4, 32)).process_block,
                           windows(), progress=False)


def test_nan_in_quantized_layer_names_block_and_layer():
    model = make_tiny_llama()

    def poison(ctx):
        if ctx.index == 1:
            ctx.linear("mlp.up_proj").weight.data[0, 0] = float("inf")

    with pytest.raises(NonFiniteError, match="block 1, layer mlp.up_proj"):
        quantize_blockwise(model, adapter_for(model), poison, None, progress=False)
