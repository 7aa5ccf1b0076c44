"""ptqcore: post-training quantization of LLMs, method by method, as in PTQ-Bench."""

__version__ = "0.1.0"
