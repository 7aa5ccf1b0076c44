"""Shared fixtures: offline mode, tiny random Llama models, the real SmolLM2 (cached once)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def tiny_llama_config(vocab_size: int = 256, **overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    # Give norms non-trivial scales so folding/equivalence tests would notice mistakes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M, loaded from the ptqcore cache (built from the GGUF on first use)."""
    from ptqcore.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(vocab_size=len(smollm2.tokenizer))
    model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for a module, then restore: small float64 ops and tiny blocks run
    fastest that way, and two threads spin against other jobs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_ids(n=4, length=32, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def fast_pipeline(name, spec):
    """`build_pipeline(name, spec)` for tiny test models: OmniQuant trains one epoch, not its default."""
    from ptqcore.pipeline import build_pipeline

    return build_pipeline(name, spec, {"epochs": 1} if "omniquant" in name else {})


def quantize_and_check(model, adapter, name, spec, tokens):
    """Quantize `model` with `name` (`fast_pipeline`) and check what every method and pipeline must
    give on any architecture: finite logits, an output moved but not destroyed (1e-4 < relative
    error < 0.5 against full precision) and changed weights. Returns the QuantResult."""
    from ptqcore.pipeline import quantize_model

    ref = logits(model, tokens)
    result = quantize_model(model, adapter, fast_pipeline(name, spec), tokens, progress=False)
    out = logits(model, tokens)
    assert torch.isfinite(out).all()
    assert 1e-4 < rel_err(out, ref) < 0.5
    assert result.weight_rel_change > 0
    return result


def quip_transform_only():
    """A `quantize_blockwise` step that applies QuIP's incoherence transform and undoes it with no
    rounding in between: an exact identity if the transform is (equivalence tests)."""
    from ptqcore.methods import get_method

    quip = get_method("quip")

    def step(ctx):
        quip.process_block(ctx)
        for name, linear in ctx.adapter.linears(ctx.block).items():
            W, _, undo = ctx.to_basis(linear.weight.data.float(), None, name)
            linear.weight.data = ctx.from_basis(W, undo).to(linear.weight.dtype)

    return step
