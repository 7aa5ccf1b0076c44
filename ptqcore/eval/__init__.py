"""Evaluation: perplexity here; zero-shot accuracy through lm-eval in `ptqcore.eval.zeroshot` (imported
on use: it needs the `lm-eval` package); VQA accuracy of a vision-language model in `ptqcore.eval.vqa`
(needs `easy-vqa`)."""

from .perplexity import model_flops_per_token, perplexity

__all__ = ["model_flops_per_token", "perplexity"]
