"""`smollm2-llava`: a LLaVA model (`LlavaForConditionalGeneration`) made here from SmolLM2-135M
(frozen) and a small CLIP vision encoder + projector trained on the easy-vqa train split.

Recipe (deterministic, seed 0; `build_llava` records every number in the card):

1. Architecture. `LlavaConfig(text_config = SmolLM2-135M's LlamaConfig, vision_config =
   CLIPVisionConfig(image 64 px, patch 16, hidden 192, 4 layers, 4 heads, MLP 768))`, LLaVA-1.5's
   feature choice (`vision_feature_layer=-2`, `vision_feature_select_strategy="default"`: the
   penultimate layer's patch tokens, CLS dropped) and its two-layer GELU projector. Each image
   is 16 image tokens. The tokenizer gains one token, `<image>` (as llava-hf's checkpoints do); the
   language model's weights are SmolLM2's, with one embedding row added for `<image>` (the mean
   embedding; Llava replaces it by image features at input, and it is tied to the head).
   Preprocessing is transformers' `CLIPImageProcessor` (OpenAI CLIP mean/std, 64 px), wrapped
   with the tokenizer in a `LlavaProcessor` saved with the checkpoint.
2. Stage 1, vision pretraining (stands in for CLIP's pretraining, no language model): the vision
   tower + two linear heads on its pooled CLS output learn each train image's shape (3 classes)
   and colour (8), labels read off the train questions and answers (`image_labels`); the heads are
   discarded.
3. Stage 2, visual instruction tuning (LLaVA's stage 2 with the language model frozen): the
   projector and the vision tower are trained through the frozen SmolLM2 on the train questions,
   prompt `ptqcore.eval.vqa.vqa_prompt(question)`, loss = cross-entropy of `" {answer}"` + the
   end-of-sequence token.
4. Evaluation: easy-vqa test exact-match accuracy (`ptqcore.eval.vqa.vqa_accuracy`, greedy).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LlavaRecipe:
    image_size: int = 64
    patch_size: int = 16  # 16 image tokens (patch 32, 4 tokens: shape accuracy of stage 1 stayed near chance)
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 768
    stage1_epochs: int = 15
    stage1_batch: int = 64
    stage1_lr: float = 1e-3
    stage2_steps: int = 160
    stage2_batch: int = 16
    stage2_lr_projector: float = 1e-3
    stage2_lr_vision: float = 2e-4
    warmup: int = 10
    eval_limit: int | None = 500  # test questions scored for the card (a seeded shuffle, see eval.vqa)
    eval_batch: int = 32
    seed: int = 0
    train_questions: int | None = None  # the first N train questions only (tests); None: all
    # 1, not 2: on this shared 2-core machine (another benchmark on one core) two threads ran the
    # recipe 15-20x slower than one (OpenMP barriers waiting on a descheduled thread).
    threads: int = 1


def image_labels(items: list[dict]) -> dict[int, dict[str, int]]:
    """Per image id, the shape and colour indices implied by its questions and answers
    ("what color is the circle?" -> red: shape circle, colour red; "is no blue shape present?"
    -> no: colour blue; a negated question answered yes says nothing)."""
    labels: dict[int, dict[str, int]] = {}
    for it in items:
        q, a = it["question"].lower(), it["answer"]
        words = set(re.findall(r"[a-z]+", q))
        shape = next((s for s in SHAPES if s in words), None)
        color = next((c for c in COLORS if c in words), None)
        known = labels.setdefault(it["image_id"], {})
        if a in ("yes", "no"):
            negated = bool(words & {"not", "no"})
            if (a == "yes") != negated:  # the mentioned attribute holds
                if shape:
                    known["shape"] = SHAPES.index(shape)
                if color:
                    known["color"] = COLORS.index(color)
            continue
        if a in SHAPES:
            known["shape"] = SHAPES.index(a)
            if color:
                known["color"] = COLORS.index(color)
        elif a in COLORS:
            known["color"] = COLORS.index(a)
            if shape:
                known["shape"] = SHAPES.index(shape)
    return labels


def make_processor(tokenizer, recipe: LlavaRecipe):
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    size = recipe.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def make_llava(text_model: nn.Module, tokenizer, recipe: LlavaRecipe) -> nn.Module:
    """A `LlavaForConditionalGeneration` with `text_model`'s language model (copied; one embedding
    row added for `<image>`), a fresh CLIP vision tower and projector (seeded)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = text_model.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=recipe.vision_hidden, intermediate_size=recipe.vision_mlp,
                              num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
                              image_size=recipe.image_size, patch_size=recipe.patch_size, projection_dim=recipe.vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=text_model.config.tie_word_embeddings)
    torch.manual_seed(recipe.seed)
    llava = LlavaForConditionalGeneration(config).eval()
    state = {k: v for k, v in text_model.model.state_dict().items()}
    emb = state.pop("embed_tokens.weight")
    with torch.no_grad():
        lm = llava.model.language_model
        missing, unexpected = lm.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"embed_tokens.weight"}:
            raise RuntimeError(f"language model weights do not match: missing {missing}, unexpected {unexpected}")
        new = torch.cat([emb, emb.mean(0, keepdim=True).expand(len(tokenizer) - emb.shape[0], -1)])
        lm.embed_tokens.weight.copy_(new)
        if not config.tie_word_embeddings:
            head = text_model.lm_head.weight
            llava.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(len(tokenizer) - head.shape[0], -1)]))
    llava.config.use_cache = False
    return llava


def _pixels(processor, items: list[dict]) -> torch.Tensor:
    from ..eval.vqa import load_image

    return processor.image_processor(images=[load_image(it["image"]) for it in items], return_tensors="pt")["pixel_values"]


def _labelled(items: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """One item per labelled image and its [shape, colour] targets (-100: unknown)."""
    labels = image_labels(items)
    first: dict[int, dict] = {}
    for it in items:
        first.setdefault(it["image_id"], it)
    ids = sorted(labels)
    return [first[i] for i in ids], torch.tensor([[labels[i].get("shape", -100), labels[i].get("color", -100)]
                                                  for i in ids])


def train_vision(llava: nn.Module, processor, train: list[dict], recipe: LlavaRecipe, progress=None,
                 test: list[dict] | None = None) -> dict:
    """Stage 1: shape and colour classification of the train images (see the module docstring);
    with `test`, the heads' accuracy on the test images too."""
    images, target = _labelled(train)
    ids = list(range(len(images)))
    pixels = _pixels(processor, images)
    tower = llava.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict({"shape": nn.Linear(width, len(SHAPES)), "color": nn.Linear(width, len(COLORS))})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed)
    steps = recipe.stage1_epochs * math.ceil(len(ids) / recipe.stage1_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.stage1_lr, total_steps=steps, pct_start=0.1)
    tower.train()
    loss = torch.tensor(0.0)
    for epoch in range(recipe.stage1_epochs):
        order = torch.randperm(len(ids), generator=g)
        for s in range(0, len(ids), recipe.stage1_batch):
            idx = order[s : s + recipe.stage1_batch]
            pooled = tower(pixel_values=pixels[idx]).pooler_output
            loss = F.cross_entropy(heads["shape"](pooled), target[idx, 0], ignore_index=-100) \
                + F.cross_entropy(heads["color"](pooled), target[idx, 1], ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress(epoch, loss.item())
    tower.eval()
    info = {"stage1_images": len(ids), "stage1_final_loss": loss.item(),
            "stage1_labelled": {k: int((target[:, j] >= 0).sum()) for j, k in enumerate(("shape", "color"))}}
    if test is not None:
        images, target = _labelled(test)
        with torch.no_grad():
            pooled = tower(pixel_values=_pixels(processor, images)).pooler_output
        for j, k in enumerate(("shape", "color")):
            known = target[:, j] >= 0
            pred = heads[k](pooled).argmax(-1)
            info[f"stage1_test_{k}_acc"] = (pred[known] == target[known, j]).float().mean().item()
    return info


def _answer_batch(processor, batch: list[dict]):
    """Inputs (right-padded) and, per row, the positions of the answer + end-of-sequence tokens."""
    from ..eval.vqa import load_image, vqa_prompt

    tok = processor.tokenizer
    texts = [vqa_prompt(it["question"]) + f" {it['answer']}{tok.eos_token}" for it in batch]
    side = tok.padding_side
    tok.padding_side = "right"  # the answer ends each row at its length (a saved processor pads left, for generation)
    try:
        inputs = processor(images=[load_image(it["image"]) for it in batch], text=texts, padding=True,
                           return_tensors="pt")
    finally:
        tok.padding_side = side
    rows, cols, targets = [], [], []
    lengths = inputs["attention_mask"].sum(1).tolist()
    for r, it in enumerate(batch):
        answer = tok(f" {it['answer']}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        end = lengths[r]
        if inputs["input_ids"][r, end - len(answer) : end].tolist() != answer:
            raise RuntimeError(f"answer tokens not found at the end of {texts[r]!r}")
        for p in range(end - len(answer), end):
            rows.append(r)
            cols.append(p - 1)  # the hidden state at p-1 predicts token p
            targets.append(inputs["input_ids"][r, p].item())
    return inputs, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def train_projector(llava: nn.Module, processor, train: list[dict], recipe: LlavaRecipe, progress=None) -> dict:
    """Stage 2: projector + vision tower through the frozen language model (answer-token loss)."""
    lm = llava.model.language_model
    lm.requires_grad_(False)
    llava.lm_head.requires_grad_(False)
    groups = [{"params": list(llava.model.multi_modal_projector.parameters()), "lr": recipe.stage2_lr_projector},
              {"params": list(llava.model.vision_tower.parameters()), "lr": recipe.stage2_lr_vision}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.stage2_steps - recipe.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = list(range(len(train)))
    random.Random(recipe.seed).shuffle(order)
    losses = []
    llava.model.multi_modal_projector.train()
    llava.model.vision_tower.train()
    for step in range(recipe.stage2_steps):
        start = (step * recipe.stage2_batch) % len(order)
        batch = [train[order[(start + i) % len(order)]] for i in range(recipe.stage2_batch)]
        inputs, rows, cols, targets = _answer_batch(processor, batch)
        hidden = llava.model(**inputs, use_cache=False).last_hidden_state
        logits = llava.lm_head(hidden[rows, cols]).float()
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, loss.item())
    llava.eval()
    tail = losses[-10:]
    return {"stage2_final_loss": sum(tail) / len(tail), "stage2_first_loss": losses[0],
            "stage2_samples": recipe.stage2_steps * recipe.stage2_batch}


def build_llava(out: Path, name: str, text_model: nn.Module, tokenizer, recipe: LlavaRecipe = LlavaRecipe(),
                base: str = "SmolLM2-135M-Instruct", progress: bool = True) -> dict:
    """Build the model of the module docstring into `out` (checkpoint, processor, card). Returns
    the recorded facts."""
    from tqdm.auto import tqdm

    from ..eval.vqa import easy_vqa_items, vqa_accuracy

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    try:
        train = easy_vqa_items("train")[: recipe.train_questions]
        processor = make_processor(tokenizer, recipe)
        llava = make_llava(text_model, processor.tokenizer, recipe)
        bar = tqdm(total=recipe.stage1_epochs, desc=f"{name} stage 1 (vision)", unit="epoch", disable=not progress)
        info = train_vision(llava, processor, train, recipe,
                            lambda i, loss: (bar.set_postfix(loss=f"{loss:.3f}"), bar.update()), test=easy_vqa_items("test"))
        bar.close()
        t1 = time.perf_counter() - start
        bar = tqdm(total=recipe.stage2_steps, desc=f"{name} stage 2 (projector)", unit="step", disable=not progress)
        info.update(train_projector(llava, processor, train, recipe,
                                    lambda i, loss: (bar.set_postfix(loss=f"{loss:.3f}"), bar.update())))
        bar.close()
        t2 = time.perf_counter() - start
        acc = vqa_accuracy(llava, processor, limit=recipe.eval_limit, seed=recipe.seed, batch_size=recipe.eval_batch,
                           progress=progress, desc=f"{name} easy_vqa test")
        llava.config.use_cache = True
        llava.save_pretrained(out)
        processor.save_pretrained(out)
        info.update({
            "name": name, "base": base, "architecture": type(llava).__name__, "recipe": asdict(recipe),
            "threads": recipe.threads, "image_tokens": (recipe.image_size // recipe.patch_size) ** 2,
            "train_questions": len(train),
            "trainable_params": sum(p.numel() for p in llava.model.vision_tower.parameters())
            + sum(p.numel() for p in llava.model.multi_modal_projector.parameters()),
            "test_accuracy": acc["value"], "test_stderr": acc["stderr"], "test_items": acc["task_items"],
            "test_limit": acc["limit"], "eval_seconds": acc["eval_seconds"], "examples": acc["examples"],
            "stage1_seconds": t1, "stage2_seconds": t2 - t1,
        })
        info["build_seconds"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    (out / "build.json").write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    r = info["recipe"]
    limit = "all" if info["test_limit"] is None else f"{info['test_items']} (a seeded shuffle, seed {r['seed']})"
    stderr = f" +- {info['test_stderr']:.3f}" if info.get("test_stderr") is not None else ""
    lines = [
        f"# {info['name']}",
        "",
        f"A LLaVA model (`{info['architecture']}`) made by `ptqcore.models.llava_recipe` in "
        f"{info['build_seconds']:.0f} s ({info['threads']} torch threads): {info['base']} as the **frozen** language "
        "model, a small CLIP vision encoder and the LLaVA projector trained here from scratch on the easy-vqa train "
        f"split ({info['train_questions']} questions on {info['stage1_images']} synthetic 64 px images of one coloured shape).",
        "",
        f"- vision: `CLIPVisionModel`, {r['image_size']} px, patch {r['patch_size']}, hidden {r['vision_hidden']}, "
        f"{r['vision_layers']} layers, {r['vision_heads']} heads, MLP {r['vision_mlp']}; LLaVA-1.5 features "
        f"(penultimate layer, CLS dropped): {info['image_tokens']} image tokens; two-layer GELU projector. "
        f"{info['trainable_params']:,} trained parameters.",
        "- tokenizer: SmolLM2's plus `<image>`; its embedding row is the mean embedding (replaced by image features "
        "at input). Every other language-model weight is SmolLM2's, unchanged.",
        f"- stage 1 (vision pretraining, no language model): shape (3) and colour (8) classification of "
        f"{info['stage1_images']} train images, labels read off their questions; {r['stage1_epochs']} epochs, "
        f"batch {r['stage1_batch']}, AdamW lr {r['stage1_lr']} one-cycle; final loss {info['stage1_final_loss']:.3f}; "
        f"{info['stage1_seconds']:.0f} s.",
        f"- stage 2 (visual instruction tuning, language model frozen): projector (lr {r['stage2_lr_projector']}) and "
        f"vision tower (lr {r['stage2_lr_vision']}) through SmolLM2, {r['stage2_steps']} steps x {r['stage2_batch']} "
        f"questions, AdamW, warmup {r['warmup']} + cosine; prompt `<image>\\nQuestion: {{question}}\\nAnswer:`, loss on "
        f"` {{answer}}<|im_end|>`; loss {info['stage2_first_loss']:.3f} -> {info['stage2_final_loss']:.3f} (mean of the "
        f"last 10 steps); {info['stage2_seconds']:.0f} s.",
        f"- **easy-vqa test exact-match accuracy (full precision): {info['test_accuracy']:.3f}{stderr}** on {limit} "
        f"test questions, greedy generation (`ptqcore.eval.vqa`), {info['eval_seconds']:.0f} s.",
        f"- seed {r['seed']} everywhere (torch init, data order).",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["COLORS", "IMAGE_TOKEN", "LlavaRecipe", "SHAPES", "build_llava", "image_labels", "make_llava",
           "make_processor", "model_card", "train_projector", "train_vision"]
