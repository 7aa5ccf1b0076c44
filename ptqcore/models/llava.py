"""LLaVA-style vision-language models (`LlavaForConditionalGeneration`) as data.

transformers 5 keeps a Llava as `model.vision_tower` (a `CLIPVisionModel` / `SiglipVisionModel`:
`embeddings`, `encoder.layers`, `post_layernorm`), `model.multi_modal_projector` (`linear_1`,
GELU, `linear_2`), `model.language_model` (e.g. a `LlamaModel`) and `lm_head`. Three adapters:

- `llava_adapter` (the default, the paper's setting): the language model's decoder blocks, with
  the llama adapter's groups. The projector's output (image features) enters the residual
  stream in place of token embeddings, so `input_writers` names `linear_2`: a rotation of the
  residual stream (QuaRot) rotates its rows like any residual writer's, which keeps the model's
  function exact.
- `vision_adapter` (`quantize_vision`): the vision encoder's layers (CLIP and SigLIP have the
  same layer: `layer_norm1` -> q/k/v -> `out_proj`, `layer_norm2` -> `fc1` -> GELU -> `fc2`; every
  linear has a bias and the norms are LayerNorms with a bias). AWQ and SmoothQuant fold into a
  LayerNorm's weight and bias; nothing folds in front of `fc2` (a GELU lies between). Rotation
  (QuaRot) is refused: a LayerNorm subtracts the mean of its input, which does not commute with
  a rotation of the residual stream (`ROTATION_REFUSAL`).
- `projector_adapter` (`quantize_vision`): the projector as a stack of one block; its linears
  follow no norm (a GELU lies between them), so only quantizers and clip searches act on it.

`quantize_vision` order (`parts`): vision tower, projector, language model, each calibrated by
the same image + text batches run through the whole model, so each part sees the outputs of the
parts quantized before it.

VILA-style checkpoints (`model_type` `llava_llama`, NVIDIA's VILA 1.5: `llm`, `mm_projector`,
`vision_tower` at the top) go through the same adapter when their module tree matches Llava's;
otherwise `llava_adapter` says what differs.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import nn

from .adapters import LLAMA, Adapter, LinearGroup

LLAVA_TYPES = ("llava", "llava_llama", "vila")
TEXT_TYPES = LLAMA.model_types
ROTATION_REFUSAL = ("QuaRot is not exact on the vision tower: its LayerNorms subtract the mean of their input "
                    "(and add a bias), which does not commute with a rotation of the residual stream; quantize the "
                    "language model only (drop --quantize-vision) or use a non-rotating method")

_PATHS = {"language": "model.language_model.layers", "vision": "model.vision_tower.encoder.layers",
          "projector": "model.multi_modal_projector"}


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def check_llava_tree(model: nn.Module) -> None:
    """Raise a clear ValueError when a vision-language model's module tree is not Llava's."""
    missing = [path for path in _PATHS.values() if not _has(model, path)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if missing:
        top = ", ".join(name for name, _ in model.named_children()) or "none"
        raise ValueError(
            f"vision-language model of type {model_type!r} ({type(model).__name__}): the llava adapter needs "
            f"{', '.join(_PATHS.values())} (LlavaForConditionalGeneration's module tree) but {', '.join(missing)} "
            f"is missing (top-level modules: {top}); convert the checkpoint to the llava-hf layout "
            "(transformers' LlavaForConditionalGeneration), e.g. a VILA checkpoint's llm / mm_projector / vision_tower")
    text_type = getattr(model.config.get_text_config(), "model_type", None)
    if text_type not in TEXT_TYPES:
        raise ValueError(f"llava language model of type {text_type!r}: supported: {', '.join(TEXT_TYPES)}")


def llava_adapter(model: nn.Module) -> Adapter:
    """The language model's blocks of a Llava (the default quantization scope)."""
    check_llava_tree(model)
    return replace(
        LLAMA, name="llava", model_types=LLAVA_TYPES, blocks=_PATHS["language"], base="model.language_model",
        embeddings=("model.language_model.embed_tokens",), final_norm="model.language_model.norm", lm_head="lm_head",
        input_writers=("model.multi_modal_projector.linear_2",),
    )


def vision_adapter(model: nn.Module) -> Adapter:
    """The vision tower's encoder layers (CLIP or SigLIP)."""
    check_llava_tree(model)
    return Adapter(
        name="llava_vision", model_types=(), blocks=_PATHS["vision"], base="model.vision_tower",
        embeddings=("model.vision_tower.embeddings.patch_embedding",), final_norm="model.vision_tower.post_layernorm",
        lm_head="model.multi_modal_projector.linear_1",
        groups=(
            LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "layer_norm1",
                        "self_attn"),
            LinearGroup("attn_out", ("self_attn.out_proj",), "self_attn.v_proj", "self_attn.out_proj"),
            LinearGroup("mlp_in", ("mlp.fc1",), "layer_norm2", "mlp.fc1"),
            LinearGroup("mlp_out", ("mlp.fc2",), None, "mlp.fc2"),
        ),
        residual_writers=("self_attn.out_proj", "mlp.fc2"),
        value_out=("self_attn.v_proj", "self_attn.out_proj"),
        query_key=("self_attn.q_proj", "self_attn.k_proj"),
        rotation_refusal=ROTATION_REFUSAL,
    )


def projector_adapter(model: nn.Module) -> Adapter:
    """The multimodal projector as a stack of one block (`linear_1` -> GELU -> `linear_2`)."""
    check_llava_tree(model)
    return Adapter(
        name="llava_projector", model_types=(), blocks=_PATHS["projector"], base=_PATHS["projector"],
        embeddings=(), final_norm="", lm_head="",
        groups=(LinearGroup("proj_in", ("linear_1",), None, "linear_1"),
                LinearGroup("proj_out", ("linear_2",), None, "linear_2")),
        rotation_refusal="the projector has no residual stream to rotate",
    )


def parts(model: nn.Module, quantize_vision: bool = False) -> list[Adapter]:
    """The adapters to quantize, in order: [vision, projector,] language model."""
    language = llava_adapter(model)
    return [vision_adapter(model), projector_adapter(model), language] if quantize_vision else [language]


def is_llava(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in LLAVA_TYPES


def calibration_batches(processor, text_tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[dict]:
    """`nsamples` calibration samples of `seqlen` tokens that carry an image and text: an easy-vqa
    train image (drawn with `random.Random(seed)`), its questions and answers as consecutive
    `vqa_prompt` turns, then the text calibration window of the same index (PROTOCOL.md's draw
    from `text_tokens`, the train stream) up to `seqlen` tokens. One model-input dict (batch of
    one: `input_ids`, `attention_mask`, `pixel_values`) per sample, as `capture_block_inputs` takes."""
    from ..data import calibration_windows
    from ..eval.vqa import easy_vqa_items, load_image, vqa_prompt

    items = easy_vqa_items("train")
    by_image: dict[int, list[dict]] = {}
    for it in items:
        by_image.setdefault(it["image_id"], []).append(it)
    images = random.Random(seed).sample(sorted(by_image), nsamples)
    windows = calibration_windows(text_tokens, nsamples, seqlen, seed)
    batches = []
    for image_id, window in zip(images, windows):
        qa = by_image[image_id]
        text = "".join(vqa_prompt(it["question"]).replace("<image>", "" if i else "<image>") + f" {it['answer']}\n"
                       for i, it in enumerate(qa))
        inputs = processor(images=[load_image(qa[0]["image"])], text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0, :seqlen]
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        if (ids == image_token).sum() != (inputs["input_ids"] == image_token).sum():
            raise ValueError(f"calibration seqlen {seqlen} cuts the image tokens; use a longer one")
        ids = torch.cat([ids, window[: seqlen - ids.numel()]])[None]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": inputs["pixel_values"]})
    return batches


def quantize_parts(model: nn.Module, adapters: list[Adapter], pipeline, calib, act=None, batch_size: int = 1,
                   progress: bool = True, desc: str | None = None, **kwargs):
    """`ptqcore.pipeline.quantize_model` on each adapter of `parts(...)` in order, with the same
    calibration batches. Returns the last (language model) part's result, with the weight change
    over every part's linears, every part's activation hooks, and `prepared` keyed by part."""
    from ..pipeline import quantize_model

    results, totals = [], []
    for adapter in adapters:
        totals.append(sum(lin.weight.detach().double().pow(2).sum().item()
                          for block in adapter.get_blocks(model) for lin in adapter.linears(block).values()))
        results.append(quantize_model(model, adapter, pipeline, calib, act, batch_size, progress=progress,
                                      desc=f"{desc or pipeline.name} {adapter.name}", **kwargs))
    last = results[-1]
    if len(results) > 1:
        last.weight_rel_change = (sum(r.weight_rel_change ** 2 * t for r, t in zip(results, totals)) / sum(totals)) ** 0.5
        last.act_hooks = [h for r in results for h in r.act_hooks]
        last.prepared = {a.name: r.prepared for a, r in zip(adapters, results)}
        for a, r in zip(adapters[:-1], results[:-1]):
            last.expert_fallbacks.update({f"{a.name}.{k}": v for k, v in r.expert_fallbacks.items()})
    return last


def load_llava(source: str, device: str, dtype: torch.dtype):
    """A Llava checkpoint folder or hub id: (model, processor); clear errors for other trees."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype)
    check_llava_tree(model)
    model.to(device).eval()
    model.config.use_cache = False
    return model, AutoProcessor.from_pretrained(source)


__all__ = ["LLAVA_TYPES", "ROTATION_REFUSAL", "calibration_batches", "check_llava_tree", "is_llava", "llava_adapter",
           "load_llava", "parts", "projector_adapter", "quantize_parts", "vision_adapter"]
