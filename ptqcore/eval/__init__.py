"""Evaluation: perplexity (zero-shot and VQA come later)."""

from .perplexity import model_flops_per_token, perplexity

__all__ = ["model_flops_per_token", "perplexity"]
