"""VQA accuracy of a LLaVA-style model on the easy-vqa test split (PyPI `easy-vqa`).

Protocol (what `vqa_accuracy` scores):

- items: the test questions of `easy_vqa.get_test_questions()` (9,673 questions on 1,000 images),
  in the order of a `random.Random(seed)` shuffle; `limit` takes the first N of that order (all
  when None). A shuffle rather than the file order, because the file lists the questions image by
  image: the first N of a shuffle cover N different images and all question types.
- prompt: `vqa_prompt(question)` = `"<image>\\nQuestion: {question}\\nAnswer:"`, the format the
  offline `smollm2-llava` was trained on; the processor (transformers' `LlavaProcessor`, from the
  checkpoint) expands `<image>` into the model's image tokens and preprocesses the PNG.
- answer: greedy generation of at most `max_new_tokens` tokens (left-padded batches), stopping
  at the tokenizer's end-of-sequence token; the text is normalised (`normalize_answer`: first
  line, lowercase, punctuation and articles removed, whitespace collapsed) and compared exactly
  with the normalised gold answer. Generation, not scoring the 13-answer set: it is the open-ended
  protocol of LLaVA's own VQA evaluations, and it does not tell the model the answer set, so a
  quantized model that stops producing valid answers loses accuracy, as it would in use.
- value: the mean of the 0/1 matches; stderr: the sample standard deviation / sqrt(n) (as
  lm-eval's `mean_stderr`).
"""

from __future__ import annotations

import math
import random
import re
import string
import time

import torch
from tqdm.auto import tqdm

VQA_DATASETS = ("easy_vqa",)
PROMPT = "<image>\nQuestion: {question}\nAnswer:"
INSTALL_HINT = "pip install -c constraints.txt easy-vqa"
# What a results row's config records about the protocol (a change here is a new config).
VQA_PROTOCOL = "easy-vqa test, seeded shuffle, greedy generation (max 4 new tokens), normalised exact match"


def vqa_prompt(question: str) -> str:
    return PROMPT.format(question=question)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """First line, lowercase, no punctuation or articles, single spaces."""
    text = text.strip().split("\n", 1)[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as err:
        from ..models.zoo import MissingPackage

        raise MissingPackage(f"the easy-vqa data set is not installed; install it with: {INSTALL_HINT}") from err
    return easy_vqa


def check_installed() -> None:
    """Raise `MissingPackage` naming the install command when easy-vqa is missing."""
    _easy_vqa()


def easy_vqa_items(split: str = "test") -> list[dict]:
    """Every (question, answer, image path) of an easy-vqa split, in the package's order."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown easy-vqa split {split!r}; available: train, test")
    ev = _easy_vqa()
    questions, answers, image_ids = (ev.get_train_questions if split == "train" else ev.get_test_questions)()
    paths = (ev.get_train_image_paths if split == "train" else ev.get_test_image_paths)()
    return [{"question": q, "answer": a, "image_id": i, "image": paths[i]}
            for q, a, i in zip(questions, answers, image_ids)]


def easy_vqa_answers() -> list[str]:
    return list(_easy_vqa().get_answers())


def load_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def select_items(items: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """The first `limit` items of a seeded shuffle (all when None)."""
    if limit is not None and limit <= 0:
        raise ValueError(f"VQA limit must be positive (or omitted for all items), got {limit}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[: limit if limit is not None else len(items)]]


@torch.inference_mode()
def generate_answers(model, processor, questions: list[str], images: list, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of a LLaVA-style model to one batch of (question, image) pairs."""
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        inputs = processor(images=images, text=[vqa_prompt(q) for q in questions], padding=True,
                           return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def vqa_accuracy(model, processor, limit: int | None = None, seed: int = 0, batch_size: int = 16,
                 max_new_tokens: int = 4, split: str = "test", progress: bool = True, desc: str = "easy_vqa") -> dict:
    """Exact-match accuracy on easy-vqa (see the module docstring). Returns a metric dict for the
    results store: dataset, metric, value, stderr, limit, task_items, seed, eval_seconds,
    items_per_s, and `examples` (the first few question / gold / answer triples)."""
    items = select_items(easy_vqa_items(split), limit, seed)
    was_training = model.training
    model.eval()
    hits, examples = [], []
    start = time.perf_counter()
    try:
        for s in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = items[s : s + batch_size]
            answers = generate_answers(model, processor, [it["question"] for it in batch],
                                       [load_image(it["image"]) for it in batch], max_new_tokens)
            for item, answer in zip(batch, answers):
                hits.append(float(normalize_answer(answer) == normalize_answer(item["answer"])))
                if len(examples) < 5:
                    examples.append((item["question"], item["answer"], answer))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    n = len(hits)
    acc = sum(hits) / n
    stderr = math.sqrt(sum((h - acc) ** 2 for h in hits) / (n - 1) / n) if n > 1 else None
    return {"dataset": "easy_vqa", "metric": "vqa_acc", "value": acc, "stderr": stderr, "limit": limit,
            "task_items": n, "seed": seed, "eval_seconds": seconds, "items_per_s": n / seconds,
            "split": split, "examples": examples}


def smoke_image(name: str = "astronaut"):
    """A real photo bundled with scikit-image (`skimage.data.<name>()`), as a PIL RGB image."""
    try:
        from skimage import data as skdata
    except ImportError as err:
        from ..models.zoo import MissingPackage

        raise MissingPackage("scikit-image is not installed; install it with: "
                             "pip install -c constraints.txt scikit-image") from err
    photos = ("astronaut", "chelsea", "coffee", "rocket")
    if name not in photos:
        raise ValueError(f"unknown smoke photo {name!r}; available: {', '.join(photos)}")
    from PIL import Image

    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def smoke_answer(model, processor, question: str = "what color is the shape?", photo: str = "astronaut") -> str:
    """The model's greedy answer to `question` about a real photo: a smoke test for any
    LLaVA-style model with a processor (the answer's content is not judged)."""
    return generate_answers(model, processor, [question], [smoke_image(photo)])[0]


__all__ = ["PROMPT", "VQA_DATASETS", "VQA_PROTOCOL", "check_installed", "easy_vqa_answers", "easy_vqa_items", "generate_answers", "normalize_answer",
           "select_items", "smoke_answer", "smoke_image", "vqa_accuracy", "vqa_prompt"]
