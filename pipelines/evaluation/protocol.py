"""The paper's Table 1 protocol: which samples, which references, the colorizations, the numbers.

Per validation row the model colors the row's sketch twice with the same noise seed:

* after a randomly drawn other row's image (never its own): those outputs against the ground truths
  give FID, the distribution-level score of colorizations "in the wild";
* after a deformed copy of the row's own ground truth (:mod:`pipelines.evaluation.deform`): those outputs
  against the ground truth give PSNR, MS-SSIM and the CLIP image cosine, the pixel-level scores.

Everything random (rows, references, sketch variants, deformations, noise seeds) is drawn up front from
``seed`` into an :class:`EvaluationPlan`, so a single process and any number of Ray actors, in any batch
order, compute the same numbers. :class:`BatchEvaluator` does the work for a batch of rows (it is what the
Ray actors of ``jobs/evaluate.py`` wrap); :func:`summarize` turns per-sample results into an
:class:`EvaluationReport` (metrics dict, Markdown table, JSON). :func:`evaluate` plans, runs (in this
process or through a runner), and, given a results folder, writes per-sample results as they arrive and
resumes from them (:mod:`pipelines.evaluation.results`).

The plug-in is off unless asked for (``EvaluationConfig.plugin``): the paper scores Table 1 without it.
The report records its state, every convention that moves a number (:func:`metrics.conventions`), and a
warning when FID comes from too few samples to compare with the paper's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.colorizer import read_config
from model.options import ColorizeOptions
from pipelines.data.layout import read_rows
from pipelines.data.tensor_cells import image_from_cell
from pipelines.evaluation.deform import Deformation, deform_reference, draw_deformation
from pipelines.evaluation.metrics import (
    PSNR_CAP_DB,
    ExtractorChoice,
    PixelMetrics,
    build_extractor,
    choose_clip_extractor,
    choose_fid_extractor,
    clip_metric_name,
    conventions,
    cosine,
    fid_metric_name,
    fid_sample_warning,
    frechet_distance,
    ms_ssim_settings,
    table1_arrow,
)
from pipelines.evaluation.results import ResultStore, fingerprint, model_stamp

PAPER_TABLE1 = {"fid": 8.28, "psnr": 28.83, "ms_ssim": 0.70, "clip_cosine": 0.912}
ROW_COLUMNS = ["id", "image", "sketches", "width", "height"]


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of one evaluation; everything that changes a number is recorded in the report."""

    samples: int | None = None  # rows to evaluate (None = every row)
    seed: int = 0
    steps: int | None = None  # None = the model's default
    size: tuple[int, int] | None = None  # output (width, height); None = each row's bucket size
    sketch_extractor: str | None = None  # which stored sketch variant; None = a random one per row
    fid_extractor: str = "inception"  # or "substitute:clip", "substitute:vae" (metrics.FID_EXTRACTORS)
    inception_weights: str | None = None
    clip_extractor: str = "openclip"  # or "substitute:model"
    clip_weights: str | None = None
    clip_heads: int | None = None
    clip_activation: str = "auto"  # the OpenCLIP tower's MLP activation: auto (from the checkpoint), gelu, quick_gelu
    plugin: bool = False  # color with the stage-2 plug-in; the paper's Table 1 is scored without it
    batch_size: int = 4  # rows per colorize call (each row is colored twice in it)
    reference_pool: int = 1024  # random references come from this many random rows (held in memory)
    device: str | None = None  # None = CUDA when available
    method: str | None = None  # the table's row label; None = the model folder's name

    def __post_init__(self):
        if self.samples is not None and self.samples < 2:
            raise ValueError(f"samples must be at least 2 (FID compares two distributions), got {self.samples}")
        if self.batch_size < 1 or self.reference_pool < 2:
            raise ValueError("batch_size must be positive and reference_pool at least 2")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (width, height), got {self.size}")

    def choices(self) -> tuple[ExtractorChoice, ExtractorChoice]:
        """The FID and CLIP extractors; raises before any work when one is missing and no substitute was
        asked for."""
        return (choose_fid_extractor(self.fid_extractor, self.inception_weights),
                choose_clip_extractor(self.clip_extractor, self.clip_weights, self.clip_heads, self.clip_activation))

    def setting(self, steps: int) -> str:
        """A short name of the settings that change numbers (MLflow keys of repeated evaluations)."""
        resolution = "bucket" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        plugin = "-plugin" if self.plugin else ""  # off (Table 1's way) keeps the names evaluations always had
        return f"{resolution}-{'all' if self.samples is None else self.samples}n-{steps}steps-seed{self.seed}{plugin}"

    def check_plugin(self, model_folder: str | Path) -> bool:
        """Whether the model folder has a plug-in; raises when ``plugin`` asks for one it lacks."""
        has_plugin = (Path(model_folder) / "plugin").is_dir()
        if self.plugin and not has_plugin:
            raise ValueError(f"--plugin asks for the stage-2 plug-in, but {model_folder} has no plugin/ folder "
                             f"(a stage-2 export has one)")
        return has_plugin


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SampleSpec:
    """Everything random about one evaluated row."""

    index: int
    row_id: str
    reference_id: str  # the random other row whose image is the FID reference
    sketch_variant: int
    seed: int
    deformation: Deformation

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SampleSpec":
        return cls(**{**data, "deformation": Deformation(**data["deformation"])})


@dataclass
class EvaluationPlan:
    specs: list[SampleSpec]
    sizes: dict[str, tuple[int, int]]  # row id → output (width, height)
    sketch_extractors: list[str]

    @property
    def min_side(self) -> int:
        return min(min(s) for s in self.sizes.values())


def plan_evaluation(dataset: str, config: EvaluationConfig) -> EvaluationPlan:
    """Draw rows, references, sketch variants, deformations and seeds from ``config.seed``."""
    catalog = read_rows(dataset, None, ["id", "width", "height", "sketch_extractors"]).to_pylist()
    bucket = {r["id"]: (int(r["width"]), int(r["height"])) for r in catalog}
    ids = sorted(bucket)
    if len(ids) < 2:
        raise ValueError(f"{dataset} has {len(ids)} distinct rows; an evaluation needs at least 2")
    count = len(ids) if config.samples is None else config.samples
    if count > len(ids):
        raise ValueError(f"asked for {count} samples but {dataset} has only {len(ids)} distinct rows")
    extractors = list(catalog[0]["sketch_extractors"])  # one preprocess config per dataset: the same in every row
    if config.sketch_extractor is not None and config.sketch_extractor not in extractors:
        raise ValueError(f"sketch extractor {config.sketch_extractor!r} is not in this dataset: {extractors}")

    rng = np.random.default_rng(config.seed)
    chosen = sorted(rng.choice(len(ids), size=count, replace=False).tolist())
    pool = sorted(rng.choice(len(ids), size=min(config.reference_pool, len(ids)), replace=False).tolist())
    specs = []
    for index, row in enumerate(chosen):
        reference = row
        while reference == row:
            reference = pool[int(rng.integers(len(pool)))]
        variant = (extractors.index(config.sketch_extractor) if config.sketch_extractor is not None
                   else int(rng.integers(len(extractors))))
        specs.append(SampleSpec(index=index, row_id=ids[row], reference_id=ids[reference], sketch_variant=variant,
                                seed=int(rng.integers(2**31)), deformation=draw_deformation(rng)))
    sizes = {s.row_id: tuple(config.size) if config.size is not None else bucket[s.row_id] for s in specs}
    return EvaluationPlan(specs, sizes, extractors)


def reference_images(dataset: str, plan: EvaluationPlan) -> dict[str, bytes]:
    """The encoded images of the plan's random references (at most ``reference_pool`` of them)."""
    table = read_rows(dataset, sorted({s.reference_id for s in plan.specs}), ["id", "image"])
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))


# ------------------------------------------------------------------------------------------ work
def _as_batch(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays → (B, 3, H, W) uint8."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def resolve_device(device: str | None) -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16) when available and not told otherwise, else CPU (fp32)."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32


class BatchEvaluator:
    """The model and the metric networks, loaded once; ``__call__`` evaluates a batch of rows."""

    def __init__(self, model_folder: str, config: EvaluationConfig, min_side: int, references: dict[str, bytes]):
        from model.colorizer import Colorizer

        fid_choice, clip_choice = config.choices()
        config.check_plugin(model_folder)
        device, dtype = resolve_device(config.device)
        self.config = config
        self.model = Colorizer.from_pretrained(model_folder, device=device, dtype=dtype)
        self.fid_network = build_extractor(fid_choice, self.model, device)
        self.clip_network = build_extractor(clip_choice, self.model, device)
        self.pixels = PixelMetrics(ms_ssim_settings(min_side))
        self.references = references

    def __call__(self, rows: list[dict], specs: list[SampleSpec], sizes: dict[str, tuple[int, int]]) -> list[dict]:
        """``rows`` (dicts with ROW_COLUMNS) and their ``specs``, in the same order → one result per row:
        psnr, ms_ssim, clip_cosine and the FID features of the ground truth and of the output."""
        from model.geometry import resize
        from model.line_art import invert

        if len(rows) != len(specs):
            raise ValueError(f"{len(rows)} rows for {len(specs)} specs")
        results: list[dict] = []
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, spec in enumerate(specs):
            by_size.setdefault(tuple(sizes[spec.row_id]), []).append(i)
        for (width, height), members in by_size.items():
            drawings, randoms, deformed, targets = [], [], [], []
            for i in members:
                row, spec = rows[i], specs[i]
                truth = image_from_cell(row["image"], cv2.IMREAD_COLOR)
                sketches = list(row["sketches"])
                drawings.append(invert(image_from_cell(sketches[spec.sketch_variant % len(sketches)], cv2.IMREAD_GRAYSCALE)))
                if spec.reference_id not in self.references:
                    raise KeyError(f"reference image {spec.reference_id} was not loaded for sample {spec.index}")
                randoms.append(image_from_cell(self.references[spec.reference_id], cv2.IMREAD_COLOR))
                deformed.append(deform_reference(truth, spec.deformation))
                same = truth.shape[:2] == (height, width)
                targets.append(truth if same else resize(truth, width, height))
            seeds = [specs[i].seed for i in members]
            options = ColorizeOptions(size=(width, height), steps=self.config.steps, plugin=self.config.plugin)
            outputs = self.model.colorize_batch(drawings * 2, randoms + deformed, options, seeds=seeds * 2)
            outputs = [np.asarray(o) for o in outputs]
            with_random, with_deformed = _as_batch(outputs[: len(members)]), _as_batch(outputs[len(members):])
            truth_batch = _as_batch(targets)
            pixel = self.pixels(with_deformed.float() / 255, truth_batch.float() / 255)
            clip = cosine(self.clip_network(with_deformed), self.clip_network(truth_batch)).cpu()
            real, fake = self.fid_network(truth_batch).cpu(), self.fid_network(with_random).cpu()
            for k, i in enumerate(members):
                spec = specs[i]
                results.append({
                    "index": spec.index, "row_id": spec.row_id, "reference_id": spec.reference_id,
                    "sketch_variant": spec.sketch_variant, "width": width, "height": height,
                    "psnr": float(pixel["psnr"][k]), "ms_ssim": float(pixel["ms_ssim"][k]),
                    "clip_cosine": float(clip[k]),
                    "fid_real": real[k].numpy().astype(np.float32), "fid_fake": fake[k].numpy().astype(np.float32),
                })
        return sorted(results, key=lambda r: r["index"])


def run_single_process(model_folder: str, dataset: str, config: EvaluationConfig, plan: EvaluationPlan,
                       references: dict[str, bytes]) -> Iterator[dict]:
    """Every batch in this process, in plan order (small runs, tests, the reference for Ray runs); yields
    each result as its batch finishes."""
    evaluator = BatchEvaluator(model_folder, config, plan.min_side, references)
    table = read_rows(dataset, [s.row_id for s in plan.specs], ROW_COLUMNS)
    rows = {}
    for row in table.to_pylist():
        rows.setdefault(row["id"], row)  # identical content may appear twice; one copy is enough
    with progress_bar(len(plan.specs), "evaluate") as bar:
        for start in range(0, len(plan.specs), config.batch_size):
            specs = plan.specs[start: start + config.batch_size]
            yield from evaluator([rows[s.row_id] for s in specs], specs, plan.sizes)
            bar.update(len(specs))


def progress_bar(total: int, what: str):
    """A samples bar on stderr (where people watch long runs; stdout keeps the table and the JSON)."""
    return tqdm(total=total, desc=what, unit="sample", dynamic_ncols=True, mininterval=2.0)


# ----------------------------------------------------------------------------------------- report
@dataclass
class EvaluationReport:
    """Aggregated numbers with their labels; ``metrics`` keys name substitutes (``fid_substitute_...``)."""

    method: str
    metrics: dict[str, float]
    labels: dict[str, str]  # metric key → column label
    extractors: dict[str, str]  # "fid" / "clip" → the network used
    settings: dict
    samples: list[dict] = field(default_factory=list)  # per-sample numbers (features left out)
    conventions: dict[str, str] = field(default_factory=dict)  # what moves a number: versions, resize, averaging
    warnings: list[str] = field(default_factory=list)  # e.g. FID at small n

    def markdown(self) -> str:
        """The paper's Table 1 layout; the paper's row fills only columns measured the standard way."""
        keys = list(self.labels)
        header = ["Method"] + [self.labels[k] + table1_arrow(k) for k in keys]
        digits = {"fid": 2, "psnr": 2, "ms_ssim": 3, "clip_cosine": 3}

        def cell(key: str, value: float | None) -> str:
            if value is None:
                return "—"
            return f"{value:.{next(d for p, d in digits.items() if key.startswith(p))}f}"

        paper = [cell(k, PAPER_TABLE1.get(k)) for k in keys]
        ours = [cell(k, self.metrics[k]) for k in keys]
        s = self.settings
        caption = (f"{s['samples']} samples at {s['resolution']}, {s['steps']} steps, seed {s['seed']}, "
                   f"guidance reference {s['reference_guidance']} / sketch {s['sketch_guidance']}. "
                   f"FID: {self.extractors['fid']}, outputs after random other rows' references. "
                   f"PSNR (capped at {s['psnr_cap_db']:g} dB, data range 1), MS-SSIM ({s['ms_ssim']}) and CLIP "
                   f"(image-embedding cosine, {self.extractors['clip']}) after references deformed from the ground "
                   f"truth. Plug-in {s['plugin']}. Paper: its own extractors, 50K samples at 1024², without the "
                   f"plug-in.")
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(keys),
                 "| Paper (Table 1) | " + " | ".join(paper) + " |",
                 f"| {self.method} | " + " | ".join(ours) + " |", ""]
        lines += [f"> **Warning:** {w}" for w in self.warnings] + ([""] if self.warnings else [])
        lines += [f"*{caption}*", "", "Conventions:", ""] + [f"- {k}: {v}" for k, v in self.conventions.items()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"method": self.method, "metrics": self.metrics, "labels": self.labels,
                "extractors": self.extractors, "settings": self.settings, "conventions": self.conventions,
                "warnings": self.warnings, "samples": self.samples}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "metrics.json", "markdown": out / "metrics.md"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=2))
        paths["markdown"].write_text(self.markdown())
        return paths


def summarize(results: Iterable[dict], plan: EvaluationPlan, config: EvaluationConfig, model_folder: str,
              dataset: str, model_config=None, resumed: int = 0) -> EvaluationReport:
    """Per-sample results (from any path, any order, duplicates allowed) → the report; ``resumed``: how
    many came from an earlier, interrupted run (recorded)."""
    by_index = {}
    for r in results:
        by_index.setdefault(int(r["index"]), r)
    missing = sorted(set(range(len(plan.specs))) - set(by_index))
    if missing:
        raise RuntimeError(f"no result for {len(missing)} planned samples (first: {missing[:5]})")
    ordered = [by_index[i] for i in range(len(plan.specs))]
    fid_choice, clip_choice = config.choices()
    fid_key, fid_label = fid_metric_name(fid_choice)
    clip_key, clip_label = clip_metric_name(clip_choice)
    real = torch.from_numpy(np.stack([np.asarray(r["fid_real"], np.float32) for r in ordered]))
    fake = torch.from_numpy(np.stack([np.asarray(r["fid_fake"], np.float32) for r in ordered]))
    metrics = {
        fid_key: frechet_distance(real, fake),
        "psnr": float(np.mean([r["psnr"] for r in ordered])),
        "ms_ssim": float(np.mean([r["ms_ssim"] for r in ordered])),
        clip_key: float(np.mean([r["clip_cosine"] for r in ordered])),
    }
    if model_config is None:
        model_config = read_config(model_folder)
    sampling = model_config.sampling
    steps = sampling.steps if config.steps is None else config.steps
    settings = {
        "samples": len(ordered), "seed": config.seed, "steps": steps,
        "resolution": "each row's bucket size" if config.size is None else f"{config.size[0]}×{config.size[1]}",
        "reference_guidance": sampling.reference_guidance, "sketch_guidance": sampling.sketch_guidance,
        "sketch_extractor": config.sketch_extractor or f"random of {plan.sketch_extractors}",
        "psnr_cap_db": PSNR_CAP_DB, "ms_ssim": ms_ssim_settings(plan.min_side).description,
        "reference_pool": config.reference_pool, "setting": config.setting(steps),
        "model": str(model_folder), "dataset": str(dataset),
        "plugin": plugin_state(config, config.check_plugin(model_folder)), "resumed_samples": resumed,
    }
    samples = [{k: v for k, v in r.items() if not k.startswith("fid_")} for r in ordered]
    for sample in samples:
        for key in ("psnr", "ms_ssim", "clip_cosine"):
            sample[key] = float(sample[key])
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"an aggregate is not finite: {metrics}")
    warning = fid_sample_warning(len(ordered))
    return EvaluationReport(
        method=config.method or Path(model_folder).name, metrics=metrics,
        labels={fid_key: fid_label, "psnr": "PSNR", "ms_ssim": "MS-SSIM", clip_key: clip_label},
        extractors={"fid": fid_choice.label(), "clip": clip_choice.label()}, settings=settings, samples=samples,
        conventions=conventions(fid_choice, clip_choice, ms_ssim_settings(plan.min_side)),
        warnings=[warning] if warning else [])


def plugin_state(config: EvaluationConfig, model_has_plugin: bool) -> str:
    """The plug-in's state as the report states it."""
    if config.plugin:
        return "on (asked for; the paper's Table 1 is scored without it)"
    return "off (Table 1's protocol)" + (", though the model has one" if model_has_plugin else "")


def plan_fingerprint(model_folder: str, dataset: str, config: EvaluationConfig, plan: EvaluationPlan) -> str:
    """What a results folder must match to be resumed: settings that change numbers, the drawn samples,
    the extractors and library versions, the model's weight files. Batch size, device and label do not
    enter (results do not depend on how they were batched)."""
    fid_choice, clip_choice = config.choices()
    settings = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "device", "method")}
    versions = {k: v for k, v in conventions(fid_choice, clip_choice, ms_ssim_settings(plan.min_side)).items()
                if k in ("torchmetrics", "torch", "open_clip")}
    return fingerprint({"settings": settings, "steps": read_config(model_folder).sampling.steps,
                        "extractors": [fid_choice.label(), clip_choice.label()], "versions": versions,
                        "model": str(Path(model_folder).resolve()), "model_weights": model_stamp(model_folder),
                        "dataset": str(dataset), "specs": [s.to_json() for s in plan.specs],
                        "sizes": sorted((k, list(v)) for k, v in plan.sizes.items())})


def evaluate(model_folder: str, dataset: str, config: EvaluationConfig, runner=None,
             results_dir: str | Path | None = None, part_size: int = 256) -> EvaluationReport:
    """Plan, run (``runner``, default :func:`run_single_process`; ``jobs/evaluate.py`` passes its Ray Data
    runner, same signature: it yields per-sample results), summarize.

    With ``results_dir`` the results are written there as they arrive (a part every ``part_size``), a rerun
    evaluates only the samples not there yet, and the report is computed from what was written; without
    it they stay in memory."""
    config.choices()  # a missing extractor fails here, before any model is loaded
    config.check_plugin(model_folder)
    plan = plan_evaluation(dataset, config)
    store, done = None, set()
    if results_dir is not None:
        store = ResultStore(results_dir, plan_fingerprint(str(model_folder), str(dataset), config, plan), part_size)
        done = store.done()
    pending = EvaluationPlan([s for s in plan.specs if s.index not in done], plan.sizes, plan.sketch_extractors)
    results: list[dict] = []
    if pending.specs:
        references = reference_images(dataset, pending)
        try:
            for result in (runner or run_single_process)(str(model_folder), str(dataset), config, pending, references):
                (store.add if store else results.append)(result)
        finally:
            if store:
                store.flush()  # what finished before a failure is kept for the rerun
    if store:
        results = store.read()
    return summarize(results, plan, config, str(model_folder), str(dataset), resumed=len(done))
