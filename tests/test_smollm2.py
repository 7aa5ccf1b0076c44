"""Smoke runs on the real SmolLM2-135M (loaded from the ptqcore cache, built from the GGUF)."""

import torch

from ptqcore import data
from ptqcore.calib import quantize_blockwise
from ptqcore.eval import perplexity
from ptqcore.methods import get_method
from ptqcore.quant import QuantSpec, fake_quant_weight


def test_real_model_is_smollm2(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and smollm2.adapter.name == "llama"
    assert next(smollm2.model.parameters()).dtype == torch.float32
    assert smollm2.native_grid == QuantSpec(4, 32)


def test_weights_lie_on_the_q4_1_grid(smollm2):
    """The GGUF weights are Q4_1: per 32 columns, min + code * scale with a float minimum. A
    W4 g32 min-max grid with a float zero point reproduces them exactly; the GPTQ-reference
    grid rounds the zero point to an integer, shifts the grid by a fraction of a step and so
    is NOT lossless at w4g32 (the protocol's "lossless by construction" needs a float zero)."""
    block = smollm2.adapter.get_blocks(smollm2.model)[0]
    for name, linear in smollm2.adapter.linears(block).items():
        w = linear.weight.data.reshape(linear.out_features, -1, 32)
        lo, step = w.amin(-1, keepdim=True), (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
        float_zero = lo + torch.round((w - lo) / step) * step
        assert ((float_zero - w).abs() / step).max() < 1e-3, name
        integer_zero = fake_quant_weight(linear.weight.data, QuantSpec(4, 32)).reshape_as(w)
        assert ((integer_zero - w).abs() / step).mean() > 0.1, name


def test_fp_perplexity_and_gptq_smoke(smollm2):
    model, adapter, tok = smollm2.model, smollm2.adapter, smollm2.tokenizer
    test = data.tokenize_split("wiki", "test", tok)
    fp = perplexity(model, adapter, test, seqlen=256, limit=2, progress=False)
    assert 5 < fp["value"] < 80 and fp["scored_tokens"] == 2 * 255

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        calib = data.calibration_windows(data.tokenize_split("wiki", "train", tok), nsamples=4, seqlen=128, seed=0)
        gptq = get_method("gptq", spec=QuantSpec(4, 128))
        quantize_blockwise(model, adapter, gptq.process_block, calib, progress=False)
        q = perplexity(model, adapter, test, seqlen=256, limit=2, progress=False)
        assert fp["value"] < q["value"] < 1.5 * fp["value"]
    finally:
        model.load_state_dict(saved)
