"""One benchmark run: load -> (calibrate + quantize) -> evaluate -> tidy rows in the store.

Everything a run's numbers depend on is in `RunSpec.config()`, whose hash keys the results
store: a recorded config is skipped unless `force`. Besides perplexity on the profile's datasets,
a run scores zero-shot tasks through lm-eval (`tasks`, `task_limit` items each; the config gains
a `zeroshot` entry only then, so perplexity-only configs keep their hashes) and records the
storage cost of the setting (`bits_per_weight`, `model_bytes`; see `ptqcore.cost`) in every row;
`export_dir` writes the packed GPTQ-format checkpoint (`ptqcore.export`). Bad input fails in
`RunSpec.validate()`, before any model is loaded; a failure later (NaN/Inf, a layer the group
size does not fit) writes nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace


from . import data
from .calib import MIN_EXPERT_TOKENS, expert_fallback_note
from .cost import model_cost
from .eval import perplexity
from .methods import FP
from .models import check_model_name, load_model
from .pipeline import build_pipeline, canonical_name, quantize_model, validate_pipeline_name
from .profiles import Profile, get_profile
from .quant import ActSpec, QuantSpec, check_group_size, setting_name
from .results import PeakMemory, ResultsStore, config_hash, make_rows, provenance


@dataclass(frozen=True)
class RunSpec:
    model: str
    method: str = "fp"  # a method or a pipeline, e.g. "gptq", "quarot+gptq"
    spec: QuantSpec | None = None
    act: ActSpec | None = None  # activation fake-quant (weight-activation settings)
    options: dict = field(default_factory=dict)  # method knobs, e.g. {"act_order": False} or {"gptq.act_order": False}
    profile: str = "cpu"
    datasets: tuple[str, ...] | None = None  # default: the profile's eval datasets
    calib_dataset: str | None = None
    nsamples: int | None = None
    calib_seqlen: int | None = None
    eval_seqlen: int | None = None
    limit: int | None = -1  # -1: the profile's limit; None: all windows
    seed: int | None = None
    device: str = "cpu"
    batch_size: int = 1  # calibration windows per block forward; 1 = the GPTQ reference (see calib)
    tasks: tuple[str, ...] | None = None  # zero-shot tasks (lm-eval names or the offline pack)
    task_limit: int | None = None  # items per task (the first N); None: all
    task_batch_size: int = 8  # lm-eval batch size (sequences per forward)
    quantize_routers: bool = False  # mixtures of experts: quantize routers and shared-expert gates too
    min_expert_tokens: int = MIN_EXPERT_TOKENS  # an expert routed fewer calibration tokens gets RTN
    quantize_vision: bool = False  # vision-language (llava): quantize the vision tower and projector too
    vqa_limit: int | None = None  # easy_vqa: test questions scored (first N of a seeded shuffle); None: all

    def resolved(self) -> tuple[Profile, "RunSpec"]:
        """The profile with this run's overrides applied."""
        p = get_profile(self.profile)
        p = replace(
            p,
            calib_dataset=self.calib_dataset or p.calib_dataset,
            nsamples=self.nsamples if self.nsamples is not None else p.nsamples,
            calib_seqlen=self.calib_seqlen if self.calib_seqlen is not None else p.calib_seqlen,
            seed=self.seed if self.seed is not None else p.seed,
            eval_datasets=tuple(self.datasets) if self.datasets else p.eval_datasets,
            eval_seqlen=self.eval_seqlen if self.eval_seqlen is not None else p.eval_seqlen,
            eval_limit=p.eval_limit if self.limit == -1 else self.limit,
        )
        return p, self

    def validate(self) -> None:
        """Every check that needs no model: names, counts, sizes. Raises ValueError."""
        check_model_name(self.model)
        validate_pipeline_name(self.method)
        p, _ = self.resolved()
        from .eval.vqa import VQA_DATASETS, check_installed

        if p.calib_dataset in VQA_DATASETS:
            raise ValueError(f"{p.calib_dataset} is an evaluation dataset; calibrate on a text dataset "
                             f"({', '.join(sorted(data.OFFLINE_CHOICES))}): a vision-language model's calibration "
                             "samples take their images from easy-vqa train")
        if any(name in VQA_DATASETS for name in p.eval_datasets):
            check_installed()  # a missing easy-vqa says what to install
        if self.vqa_limit is not None and (self.vqa_limit <= 0 or not set(p.eval_datasets) & set(VQA_DATASETS)):
            raise ValueError(f"VQA limit must be positive and needs --datasets easy_vqa, got {self.vqa_limit}")
        for name in (p.calib_dataset, *p.eval_datasets):
            if name in VQA_DATASETS:
                continue
            if name not in data.DATASETS:
                raise ValueError(f"unknown dataset {name!r}; available: "
                                 f"{', '.join(sorted([*data.DATASETS, *VQA_DATASETS]))}")
            if name not in data.OFFLINE_CHOICES:
                data.load_text(name, "test")  # network datasets fail here, before any model is loaded
        for what, value in (("sample count", p.nsamples), ("calibration seqlen", p.calib_seqlen),
                            ("eval seqlen", p.eval_seqlen), ("batch size", self.batch_size)):
            if value <= 0:
                raise ValueError(f"{what} must be positive, got {value}")
        if p.eval_limit is not None and p.eval_limit <= 0:
            raise ValueError(f"limit must be positive (or omitted for all windows), got {p.eval_limit}")
        if self.tasks is not None:
            from .tasks import check_tasks

            check_tasks(self.tasks)  # unknown names, upstream tasks offline, lm-eval missing
        if self.task_limit is not None and (self.tasks is None or self.task_limit <= 0):
            raise ValueError(f"task limit must be positive and needs --tasks, got {self.task_limit}")
        if isinstance(self.min_expert_tokens, bool) or not isinstance(self.min_expert_tokens, int) \
                or self.min_expert_tokens < 0:
            raise ValueError(f"min expert tokens must be an integer >= 0, got {self.min_expert_tokens!r}")
        if self.task_batch_size <= 0:
            raise ValueError(f"task batch size must be positive, got {self.task_batch_size}")
        if self.method == FP.name:
            if self.spec is not None or self.act is not None or self.options or self.quantize_routers \
                    or self.quantize_vision:
                raise ValueError("method fp quantizes nothing: drop --wbits/--group-size/--abits/--option/"
                                 "--quantize-routers/--quantize-vision")
        else:
            if self.spec is None:
                raise ValueError(f"method {self.method} needs --wbits")
            self.pipeline()  # validates the chain and its knobs

    def pipeline(self):
        if self.method == FP.name:
            return None
        p, _ = self.resolved()
        return build_pipeline(self.method, self.spec, self.options, defaults=p.method_defaults)

    def method_config(self) -> dict:
        pipeline = self.pipeline()
        return pipeline.config() if pipeline else {}

    def config(self) -> dict:
        """Everything that defines the numbers (the results-store key); no provenance."""
        p, _ = self.resolved()
        pipeline = self.pipeline()
        calibrated = pipeline is not None and pipeline.needs_calibration
        config = {
            "model": self.model,
            "method": canonical_name(self.method),  # aliases (quip, quip+gptq) share one record
            "method_config": self.method_config(),
            "setting": setting_name(self.spec, self.act),
            "act": self.act.to_dict() if self.act else None,
            "calib": self.calib() if calibrated else None,
            "eval": {"datasets": list(p.eval_datasets), "seqlen": p.eval_seqlen, "limit": p.eval_limit},
            "profile": p.name,
            "device": self.device,
        }
        moe = {k: v for k, v in (("quantize_routers", self.quantize_routers),
                                   ("min_expert_tokens", self.min_expert_tokens))
               if v != RunSpec.__dataclass_fields__[k].default}
        if moe:  # only when not the defaults, so every other config keeps its hash
            config["moe"] = moe
        if self.quantize_vision:  # the same: only when not the default
            config["vlm"] = {"quantize_vision": True}
        from .eval.vqa import VQA_DATASETS, VQA_PROTOCOL

        if set(p.eval_datasets) & set(VQA_DATASETS):
            config["eval"]["vqa"] = {"limit": self.vqa_limit, "seed": p.seed, "protocol": VQA_PROTOCOL}
        if self.tasks:
            config["zeroshot"] = {"tasks": list(self.tasks), "limit": self.task_limit, "num_fewshot": 0,
                                  "batch_size": self.task_batch_size, "seed": p.seed}
        return config

    def result_keys(self) -> list[str]:
        """The results-store keys that answer this spec, best first: its own config's hash, then
        the same config evaluated in one run on more text datasets, in any order. A perplexity
        does not depend on what else its run evaluated, so a wiki+sotu record serves a wiki-only
        spec (the structures study reuses the methods benchmark's dense runs this way)."""
        config = self.config()
        keys = [config_hash(config)]
        wanted = config["eval"]["datasets"]
        if set(config["eval"]) != {"datasets", "seqlen", "limit"}:  # VQA: its accuracy has its own protocol
            return keys
        extras = [name for name in data.DATASETS if name not in wanted]
        for n in range(len(extras) + 1):
            for more in itertools.combinations(extras, n):
                for order in itertools.permutations([*wanted, *more]):
                    key = config_hash({**config, "eval": {**config["eval"], "datasets": list(order)}})
                    if key not in keys:
                        keys.append(key)
        return keys

    def calib(self) -> dict:
        p, _ = self.resolved()
        return {"dataset": p.calib_dataset, "nsamples": p.nsamples, "seqlen": p.calib_seqlen, "seed": p.seed,
                "batch_size": self.batch_size}


# A quantized model whose weights moved less than this (relative Frobenius norm) is the
# checkpoint itself: the setting was lossless by construction.
LOSSLESS_REL_CHANGE = 1e-6


def native_grid_note(native: QuantSpec | None, spec: QuantSpec | None) -> str:
    """Where a setting has the layout of the checkpoint's own grid (SmolLM2: Q4_1, W4 g32
    asymmetric), say so; whether it is really lossless is measured, not assumed."""
    if native is None or spec is None or spec.sym or spec.bits < native.bits or spec.group_size is None:
        return ""
    if native.group_size % spec.group_size:
        return ""
    return (f"the checkpoint's weights lie on a {native.name} asymmetric grid (Q4_1, float zero point); this "
            "setting has that layout, but the GPTQ-reference grid rounds the zero point to an integer")


def run(spec: RunSpec, out: str = "results", force: bool = False, progress: bool = True, log=print,
        export_dir: str | None = None) -> list[dict]:
    """Execute one run and append its rows to the store under `out`. Returns the rows
    (empty when the config was already recorded and not `force`). `export_dir`: also write the
    quantized model as a packed GPTQ-format checkpoint there (weight-only settings)."""
    spec.validate()
    store = ResultsStore(out)
    config = spec.config()
    key = config_hash(config)
    if export_dir is not None:
        from .export import FORMAT_BITS

        if spec.spec is None or spec.act is not None or spec.spec.bits not in FORMAT_BITS:
            raise ValueError(f"--export writes the GPTQ format: weight-only settings of {FORMAT_BITS} bits, "
                             f"not {config['setting']}")
        if spec.quantize_vision:
            raise ValueError("--export writes the language model's linears only; drop --quantize-vision")
        basis = [step.info.name for step in spec.pipeline().steps if step.info.sets_basis]
        if basis:
            raise ValueError(f"--export: {basis[0]} quantizes each layer in a changed basis, which the GPTQ "
                             "format cannot store")
    served = None if force else store.first_recorded(spec.result_keys())
    if served is not None:
        wider = "" if served == key else ", by a run that evaluated more datasets"
        log(f"skip: {spec.model} {spec.method} {config['setting']} already recorded ({served}{wider}); "
            "--force reruns it")
        return []
    p, _ = spec.resolved()
    # the code and machine as the run starts: a checkout moved during a long run must not relabel it
    origin = provenance(spec.device)
    if spec.tasks:
        from .tasks import prepare_tasks

        prepare_tasks(spec.tasks, progress)  # a task source that cannot be had fails before the model loads
    loaded = load_model(spec.model, spec.device)
    model, adapter = loaded.model, loaded.adapter
    if spec.quantize_routers:
        adapter = adapter.with_quantized_routers()
    processor = loaded.extra.get("processor")  # vision-language models (llava) only
    adapters = [adapter]
    if processor is not None or spec.quantize_vision:
        from .models.llava import is_llava, parts

        if not is_llava(model) or processor is None:
            raise ValueError(f"--quantize-vision needs a vision-language (llava) model with a processor, not {spec.model}")
        adapters = parts(model, spec.quantize_vision)  # [vision tower, projector,] language model
    from .eval.vqa import VQA_DATASETS

    if processor is None and set(p.eval_datasets) & set(VQA_DATASETS):
        raise ValueError(f"dataset easy_vqa needs a vision-language model with a processor (e.g. smollm2-llava), "
                         f"not {spec.model}")
    if spec.spec is not None:  # a group size wider than a layer's input fails before any work
        for part in adapters:
            for block_index, block in enumerate(part.get_blocks(model)):
                for name, linear in part.linears(block).items():
                    check_group_size(linear.in_features, spec.spec, f"{name} (block {block_index})")
    cost = model_cost(model, adapter, spec.spec)  # from the shapes: what the packed model stores
    export_bytes = None

    with PeakMemory(spec.device) as peak:
        quant_seconds, weight_rel_change = 0.0, 0.0
        moe_note = ""  # mixture-of-experts: how many expert linears fell back to RTN (too few routed tokens)
        pipeline = spec.pipeline()
        if pipeline is not None:
            calib_ids = None
            if pipeline.needs_calibration:
                train = data.tokenize_split(p.calib_dataset, "train", loaded.tokenizer)
                if processor is not None:  # samples carry an image and text (see models.llava)
                    from .models.llava import calibration_batches

                    calib_ids = calibration_batches(processor, train, p.nsamples, p.calib_seqlen, p.seed)
                else:
                    calib_ids = data.calibration_windows(train, p.nsamples, p.calib_seqlen, p.seed)
            start = time.perf_counter()
            if processor is not None:
                from .models.llava import quantize_parts

                result = quantize_parts(model, adapters, pipeline, calib_ids, spec.act, spec.batch_size,
                                        progress=progress, desc=f"{spec.method} {config['setting']}",
                                        min_expert_tokens=spec.min_expert_tokens)
            else:
                result = quantize_model(model, adapter, pipeline, calib_ids, spec.act, spec.batch_size,
                                        progress=progress, desc=f"{spec.method} {config['setting']}",
                                        min_expert_tokens=spec.min_expert_tokens)
            weight_rel_change = result.weight_rel_change
            moe_note = expert_fallback_note(result.expert_fallbacks)
            quant_seconds = time.perf_counter() - start
            if export_dir is not None:
                from .export import export_packed

                exported = export_packed(model, adapter, result.states, spec.spec, export_dir, loaded.tokenizer,
                                         method_config=config["method_config"])
                export_bytes = exported["bytes"]
                log(f"exported {exported['checkpoint_format']} checkpoint to {export_dir} "
                    f"({export_bytes / 2**20:.1f} MiB)")
        metrics = []
        for dataset in p.eval_datasets:
            if dataset in VQA_DATASETS:
                from .eval.vqa import vqa_accuracy

                res = vqa_accuracy(model, processor, spec.vqa_limit, p.seed, progress=progress)
                metrics.append({k: v for k, v in res.items() if k not in ("examples", "split")}
                               | {"seqlen": None, "scored_tokens": None})
                continue
            test = data.tokenize_split(dataset, "test", loaded.tokenizer)
            result = perplexity(model, adapter, test, p.eval_seqlen, p.eval_limit, desc=f"ppl {dataset}",
                                progress=progress)
            metrics.append({"dataset": dataset, "metric": "ppl", "value": result["value"], "stderr": None,
                            "seqlen": p.eval_seqlen, "limit": p.eval_limit, "scored_tokens": result["scored_tokens"],
                            "eval_seconds": result["eval_seconds"], "tokens_per_s": result["tokens_per_s"],
                            "flops_per_s": result["flops_per_s"]})
        if spec.tasks:
            from .eval.zeroshot import zeroshot

            metrics += zeroshot(model, loaded.tokenizer, spec.tasks, spec.task_limit, spec.task_batch_size, p.seed,
                                progress=progress, log=log)
    base = {
        **origin,
        "config_hash": key,
        "model": spec.model,
        "method": spec.method,
        "method_config": config["method_config"],
        "setting": config["setting"],
        "wbits": spec.spec.bits if spec.spec else 16,
        "group_size": spec.spec.group_size if spec.spec else None,
        "sym": spec.spec.sym if spec.spec else None,
        "abits": spec.act.bits if spec.act else 16,
        "calib": config["calib"] if not (processor is not None and config["calib"]) else
        {**config["calib"], "images": "easy_vqa train: one image + its questions and answers, then the text window"},
        "seed": p.seed,
        "profile": p.name,
        "quant_seconds": quant_seconds,
        "peak_rss_bytes": int(peak.peak_bytes),
        "weight_rel_change": weight_rel_change,
        "lossless_by_construction": spec.spec is not None and weight_rel_change < LOSSLESS_REL_CHANGE,
        "bits_per_weight": cost.bits_per_weight,
        "model_bytes": cost.model_bytes,
        "export_bytes": export_bytes,
        "notes": "; ".join(n for n in (native_grid_note(loaded.native_grid, spec.spec), moe_note) if n),
    }
    if processor is not None:  # a vision-language model: which parts were quantized
        base["quantize_vision"] = spec.quantize_vision
    rows = make_rows(base, metrics)
    store.write_run(rows)
    return rows


def _summary_value(r: dict) -> str:
    if r["metric"] == "ppl":
        return f"{r['dataset']} ppl {r['value']:.4g} ({r['eval_seconds']:.0f} s eval, {r['tokens_per_s']:.0f} tok/s)"
    stderr = f" +- {r['stderr']:.3f}" if r.get("stderr") is not None else ""
    return f"{r['dataset']} {r['metric']} {r['value']:.3f}{stderr} ({r.get('task_items')} items)"


def summary_line(rows: list[dict]) -> str:
    first = rows[0]
    values = ", ".join(_summary_value(r) for r in rows)
    size = ""
    if first.get("bits_per_weight") is not None:
        size = f"{first['bits_per_weight']:.3g} bits/weight, {first['model_bytes'] / 2**20:.1f} MiB packed; "
    return (f"{first['model']} {first['method']} {first['setting']}: {values}; {size}"
            f"quant {first['quant_seconds']:.1f} s, "
            f"peak RSS {first['peak_rss_bytes'] / 2**30:.2f} GiB, {first['torch_threads']} threads "
            f"[{first['run_id']}]")


__all__ = ["LOSSLESS_REL_CHANGE", "RunSpec", "native_grid_note", "run", "summary_line"]
