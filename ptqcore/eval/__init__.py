"""Evaluation: perplexity here; zero-shot accuracy through lm-eval in `ptqcore.eval.zeroshot` (imported
on use: it needs the `lm-eval` package). VQA comes later."""

from .perplexity import model_flops_per_token, perplexity

__all__ = ["model_flops_per_token", "perplexity"]
