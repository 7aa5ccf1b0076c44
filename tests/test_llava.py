"""Vision-language (LLaVA): every method and pipeline on tiny random Llava models (CLIP and SigLIP
vision towers), the language model by default and the vision side with `quantize_vision`;
equivalence transforms exact or refused with a reason; calibration carries images; VQA scoring;
the smollm2-llava recipe at a tiny size; a real photo as a smoke input."""

import copy

import pytest
import torch

from ptqcore.calib import capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.models import adapter_for
from ptqcore.models import llava as vlm
from ptqcore.pipeline import build_pipeline
from ptqcore.quant import QuantSpec

from conftest import fast_pipeline, rel_err, tiny_llama_config, quip_transform_only

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(4, 32)
METHODS = ["rtn", "gptq", "awq", "smoothquant", "quarot", "quarot+rtn", "quip", "omniquant"]
PIPELINES = ["quarot+gptq", "quip+gptq", "awq+gptq", "smoothquant+gptq", "awq+omniquant"]
VOCAB = 256
IMAGE_TOKEN = VOCAB - 1
IMAGE, PATCH = 32, 8
N_IMAGE_TOKENS = (IMAGE // PATCH) ** 2  # LLaVA-1.5 features: CLS dropped


def make_llava(vision: str = "clip", seed: int = 0, vocab_size: int = VOCAB, image_token_id: int = IMAGE_TOKEN):
    """A tiny random Llava: a 2-block Llama (hidden 64) and a 2-layer CLIP or SigLIP (hidden 32,
    32 px, patch 8), norms and biases randomised so folding mistakes would show."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
                patch_size=PATCH)
    vision_config = CLIPVisionConfig(**vcfg) if vision == "clip" else SiglipVisionConfig(**vcfg)
    config = LlavaConfig(vision_config=vision_config, text_config=tiny_llama_config(vocab_size),
                         image_token_id=image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if vision == "clip" else "full")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.config.use_cache = False
    return model


def n_image_tokens(model) -> int:
    return N_IMAGE_TOKENS  # CLIP: CLS dropped ("default"); SigLIP has none ("full")


def batches(model, n=4, text=16, seed=0, pixel_seed=None):
    """Calibration batches of one: image tokens, then random text; random pixels."""
    g = torch.Generator().manual_seed(seed)
    gp = torch.Generator().manual_seed(seed if pixel_seed is None else pixel_seed)
    out = []
    for _ in range(n):
        ids = torch.cat([torch.full((n_image_tokens(model),), IMAGE_TOKEN), torch.randint(0, IMAGE_TOKEN, (text,), generator=g)])
        out.append({"input_ids": ids[None], "pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=gp)})
    return out


def outputs(model, data):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in data])


def quantize(model, name, quantize_vision=False, data=None):
    data = data or batches(model)
    return vlm.quantize_parts(model, vlm.parts(model, quantize_vision), fast_pipeline(name, SPEC), data, progress=False)


# --- adapters -------------------------------------------------------------------------------

@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_adapters_cover_the_module_tree(vision):
    model = make_llava(vision)
    language = adapter_for(model)
    assert language.name == "llava" and len(language.get_blocks(model)) == 2
    assert set(language.linears(language.get_blocks(model)[0])) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert language.input_writers == ("model.multi_modal_projector.linear_2",)
    tower, projector, lm = vlm.parts(model, quantize_vision=True)
    assert set(tower.linears(tower.get_blocks(model)[1])) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}
    assert list(projector.linears(projector.get_blocks(model)[0])) == ["linear_1", "linear_2"]
    assert vlm.parts(model) == [language]


def test_other_trees_get_a_clear_message():
    model = make_llava()
    model.model.mm_projector = model.model.multi_modal_projector  # a VILA-like tree: llm / mm_projector
    del model.model.multi_modal_projector
    with pytest.raises(ValueError, match="missing .*convert the checkpoint to the llava-hf layout"):
        adapter_for(model)


# --- every method and pipeline runs -----------------------------------------------------------

@pytest.mark.parametrize("name", METHODS + PIPELINES)
def test_every_method_and_pipeline_runs_on_the_language_model(name):
    model = make_llava()
    data = batches(model)
    ref = outputs(model, data)
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    result = quantize(model, name, data=data)
    out = outputs(model, data)
    assert torch.isfinite(out).all() and 1e-4 < rel_err(out, ref) < 0.5
    assert result.weight_rel_change > 0
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if "vision_tower" in n)


NON_ROTATING = ["rtn", "gptq", "awq", "smoothquant", "quip", "omniquant", "awq+gptq", "quip+gptq", "smoothquant+gptq",
                "awq+omniquant"]


@pytest.mark.parametrize("vision, name", [("clip", n) for n in NON_ROTATING]
                         + [("siglip", n) for n in ("gptq", "awq", "smoothquant", "omniquant")])
def test_every_non_rotating_method_quantizes_the_vision_side_too(vision, name):
    model = make_llava(vision)
    data = batches(model)
    ref = outputs(model, data)
    fc1 = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.detach().clone()
    proj = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    result = quantize(model, name, quantize_vision=True, data=data)
    out = outputs(model, data)
    assert torch.isfinite(out).all() and 1e-4 < rel_err(out, ref) < 0.5
    assert not torch.equal(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight, fc1)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, proj)
    assert set(result.prepared) == {"llava_vision", "llava_projector", "llava"}


@pytest.mark.parametrize("name", ["quarot", "quarot+rtn", "quarot+gptq"])
def test_quarot_on_the_vision_tower_is_refused_with_the_reason(name):
    model = make_llava()
    with pytest.raises(ValueError, match="LayerNorms subtract the mean"):
        quantize(model, name, quantize_vision=True)


# --- equivalence transforms keep the logits (float32, < 1e-4 relative) -----------------------

def _transform_only(model, adapter, method, data, **knobs):
    step = get_method(method, spec=SPEC, **knobs)
    step.prepare(model, adapter)
    return quantize_blockwise(model, adapter, step.process_block, data, progress=False)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("method, knobs, parts", [
    ("awq", {"clip": False}, (0, 1, 2)), ("smoothquant", {}, (0, 1, 2)), ("quarot", {}, (2,))])
def test_equivalence_transforms_keep_the_logits(vision, method, knobs, parts):
    model = make_llava(vision)
    data = batches(model)
    ref = outputs(model, data)
    adapters = vlm.parts(model, quantize_vision=True)
    linear_2 = model.model.multi_modal_projector.linear_2.weight.detach().clone()
    states = [_transform_only(model, adapters[i], method, data, **knobs).states for i in parts]
    assert rel_err(outputs(model, data), ref) < 1e-4
    if method == "quarot":  # the projector's output entered the rotated residual stream
        assert not torch.allclose(model.model.multi_modal_projector.linear_2.weight, linear_2)
    if method == "awq":  # vision: folded into LayerNorm weight + bias; nothing folds in front of fc2 (GELU)
        assert {"attn_in", "mlp_in"} <= set(states[0][0]["scales"])
        assert "no preceding op" in states[0][0]["skipped"]["mlp_out"]


def test_quip_without_quantization_keeps_the_logits():
    model = make_llava()
    data = batches(model)
    ref = outputs(model, data)
    identity_quantizer = quip_transform_only()

    for adapter in vlm.parts(model, quantize_vision=True):
        quantize_blockwise(model, adapter, identity_quantizer, data, progress=False)
    assert rel_err(outputs(model, data), ref) < 1e-4


# --- calibration carries images ---------------------------------------------------------------

def test_calibration_inputs_carry_the_images():
    model = make_llava()
    language, tower = adapter_for(model), vlm.vision_adapter(model)
    a, kwargs = capture_block_inputs(model, language, batches(model, pixel_seed=1))
    b, _ = capture_block_inputs(model, language, batches(model, pixel_seed=2))
    n = N_IMAGE_TOKENS
    assert a.shape == (4, n + 16, 64) and "position_embeddings" in kwargs
    assert not torch.allclose(a[:, :n], b[:, :n])  # image features differ with the image
    torch.testing.assert_close(a[:, n:], b[:, n:])  # the text embeddings do not
    v, vkw = capture_block_inputs(model, tower, batches(model, pixel_seed=1))
    assert v.shape == (4, n + 1, 32) and "attention_mask" in vkw  # patches + CLS; the mask passed positionally


# --- VQA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vqa_model(smollm2):
    """A tiny random Llava with SmolLM2's tokenizer + `<image>` and the recipe's processor."""
    from ptqcore.models.llava_recipe import LlavaRecipe, make_processor

    tokenizer = copy.deepcopy(smollm2.tokenizer)
    processor = make_processor(tokenizer, LlavaRecipe(image_size=IMAGE, patch_size=PATCH))
    model = make_llava(vocab_size=len(processor.tokenizer),
                       image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))
    return model, processor


def test_vqa_scores_a_tiny_random_llava(tiny_vqa_model):
    from ptqcore.eval.vqa import normalize_answer, vqa_accuracy

    model, processor = tiny_vqa_model
    res = vqa_accuracy(model, processor, limit=6, batch_size=3, max_new_tokens=2, progress=False)
    assert res["dataset"] == "easy_vqa" and res["metric"] == "vqa_acc" and res["task_items"] == 6
    assert 0.0 <= res["value"] <= 1.0 and res["stderr"] is not None and res["stderr"] >= 0
    assert normalize_answer(" The Red.\nmore") == "red"


def test_answer_batch_marks_the_answer_tokens_whatever_the_padding_side(tiny_vqa_model):
    """Training rows end with their answer: right padding is used even when the processor pads
    left (as a saved checkpoint's does, for generation), and the processor is left as it was."""
    from ptqcore.eval.vqa import easy_vqa_items
    from ptqcore.models.llava_recipe import _answer_batch

    _, processor = tiny_vqa_model
    tok = processor.tokenizer
    items = easy_vqa_items("train")[:2]
    batch = [dict(items[0], question="what shape is present?", answer="rectangle"),
             dict(items[1], question="is there not a very small blue shape in this image?", answer="no")]
    tok.padding_side = "left"
    inputs, rows, cols, targets = _answer_batch(processor, batch)
    assert tok.padding_side == "left"
    for r, it in enumerate(batch):
        want = tok(f" {it['answer']}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        assert targets[rows == r].tolist() == want
        assert (inputs["input_ids"][r, cols[rows == r] + 1] == targets[rows == r]).all()


def test_real_photo_smoke_input(tiny_vqa_model):
    from ptqcore.eval.vqa import smoke_answer, smoke_image

    model, processor = tiny_vqa_model
    photo = smoke_image("astronaut")
    assert photo.size == (512, 512)
    assert isinstance(smoke_answer(model, processor, "what color is the shape?", "chelsea"), str)
    with pytest.raises(ValueError, match="available: astronaut, chelsea"):
        smoke_image("lena")


def test_llava_calibration_batches(tiny_vqa_model):
    model, processor = tiny_vqa_model
    train = torch.randint(0, 1000, (5000,), generator=torch.Generator().manual_seed(0))  # a text token stream
    calib = vlm.calibration_batches(processor, train, nsamples=2, seqlen=64, seed=0)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert len(calib) == 2 and all(b["input_ids"].shape == (1, 64) for b in calib)
    assert all(int((b["input_ids"] == image_token).sum()) == N_IMAGE_TOKENS for b in calib)
    assert calib[0]["pixel_values"].shape == (1, 3, IMAGE, IMAGE)
    text = processor.tokenizer.decode(calib[0]["input_ids"][0, N_IMAGE_TOKENS:])
    assert text.startswith("\nQuestion: ") and "Answer:" in text  # the image's own questions first
    result = vlm.quantize_parts(model, vlm.parts(model, True), build_pipeline("gptq", SPEC), calib, progress=False)
    assert result.weight_rel_change > 0


def test_missing_easy_vqa_says_what_to_install(monkeypatch):
    import sys

    from ptqcore.eval import vqa
    from ptqcore.models import MissingPackage

    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    with pytest.raises(MissingPackage, match="pip install -c constraints.txt easy-vqa"):
        vqa.easy_vqa_items("test")


# --- the smollm2-llava recipe at a tiny size --------------------------------------------------

def test_recipe_builds_a_tiny_llava_with_its_card(tmp_path, monkeypatch, smollm2):
    """The smollm2-llava recipe end to end at a tiny size (a tiny random Llama as the language
    model), built through the zoo's cache (temp folder, then rename) and loaded back."""
    import json

    from conftest import make_tiny_llama
    from ptqcore.models import load_model
    from ptqcore.models.llava_recipe import LlavaRecipe, build_llava
    from ptqcore.models.zoo import ModelEntry, cached_checkpoint

    monkeypatch.setenv("PTQCORE_CACHE", str(tmp_path))
    text = make_tiny_llama(vocab_size=len(smollm2.tokenizer))
    recipe = LlavaRecipe(image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                         stage1_epochs=1, stage1_batch=16, stage2_steps=2, stage2_batch=4, warmup=1, eval_limit=4,
                         eval_batch=4, threads=1, train_questions=200)
    entry = ModelEntry("tiny-llava", "test", lambda out: build_llava(out, "tiny-llava", text,
                                                                     copy.deepcopy(smollm2.tokenizer), recipe,
                                                                     base="a tiny random Llama", progress=False))
    folder = cached_checkpoint(entry)
    assert folder == tmp_path / "models" / "tiny-llava"
    info = json.loads((folder / "build.json").read_text())
    assert info["build_seconds"] > 0 and info["threads"] == 1 and info["test_items"] == 4
    assert 0 <= info["test_accuracy"] <= 1 and 10 < info["stage1_images"] < 40 and info["train_questions"] == 200
    card = (folder / "README.md").read_text()
    assert "frozen" in card and "easy-vqa test exact-match accuracy" in card
    loaded = load_model(str(folder))
    assert loaded.adapter.name == "llava" and loaded.extra["processor"] is not None
    torch.testing.assert_close(loaded.model.model.language_model.layers[0].mlp.up_proj.weight,
                               text.model.layers[0].mlp.up_proj.weight)  # the language model stays frozen


def test_image_labels_read_off_the_questions():
    from ptqcore.models.llava_recipe import COLORS, SHAPES, image_labels

    items = [{"image_id": 0, "question": "what color is the circle?", "answer": "red"},
             {"image_id": 1, "question": "is no blue shape present?", "answer": "no"},
             {"image_id": 1, "question": "does the image not contain a triangle?", "answer": "yes"},
             {"image_id": 2, "question": "is there a rectangle in the image?", "answer": "yes"}]
    labels = image_labels(items)
    assert labels[0] == {"shape": SHAPES.index("circle"), "color": COLORS.index("red")}
    assert labels[1] == {"color": COLORS.index("blue")}  # a negated question answered yes says nothing
    assert labels[2] == {"shape": SHAPES.index("rectangle")}


def test_runner_scores_easy_vqa_with_the_vision_flag(tmp_path, tiny_vqa_model):
    """`ptq-bench run --datasets easy_vqa --vqa-limit N [--quantize-vision]` through the runner on a
    tiny Llava checkpoint: image + text calibration, a vqa_acc row with stderr, the flag in the
    config only when set."""
    import math

    from ptqcore.results import config_hash
    from ptqcore.runner import RunSpec, run

    model, processor = tiny_vqa_model
    ckpt = tmp_path / "tiny-llava"
    copy.deepcopy(model).save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    base = dict(model=str(ckpt), method="gptq", spec=SPEC, datasets=("easy_vqa",), vqa_limit=4, nsamples=2,
                calib_seqlen=64)
    assert "vlm" not in RunSpec(**base).config()
    assert config_hash(RunSpec(**base, quantize_vision=False).config()) == config_hash(RunSpec(**base).config())
    spec = RunSpec(**base, quantize_vision=True)
    assert spec.config()["vlm"] == {"quantize_vision": True} and spec.config()["eval"]["vqa"]["limit"] == 4
    rows = run(spec, out=str(tmp_path / "res"), progress=False, log=lambda *a: None)
    (row,) = rows
    assert row["dataset"] == "easy_vqa" and row["metric"] == "vqa_acc" and row["task_items"] == 4
    assert 0 <= row["value"] <= 1 and row["stderr"] is not None and row["quant_seconds"] > 0
    assert "easy_vqa train" in row["calib"]["images"] and math.isfinite(row["weight_rel_change"])
    with pytest.raises(ValueError, match="needs a vision-language"):
        run(RunSpec("tiny-llama", datasets=("easy_vqa",), vqa_limit=2), out=str(tmp_path / "res2"), progress=False,
            log=lambda *a: None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vqa_limit=10), "VQA limit must be positive and needs --datasets easy_vqa"),
    (dict(datasets=("easy_vqa",), vqa_limit=0), "VQA limit must be positive"),
    (dict(quantize_vision=True), "method fp quantizes nothing: .*--quantize-vision"),
    (dict(calib_dataset="easy_vqa", method="gptq", spec=SPEC), "easy_vqa is an evaluation dataset; calibrate on a text"),
    (dict(datasets=("easy-vqa",)), "unknown dataset 'easy-vqa'; available: c4, easy_vqa, sotu"),
])
def test_bad_vlm_input_is_refused_before_loading(kwargs, message):
    from ptqcore.runner import RunSpec

    with pytest.raises(ValueError, match=message):
        RunSpec(**{"model": "smollm2-llava", **kwargs}).validate()
