"""The paper's ablation ladder as data: which runs, in which order, and how their results are tabulated.

Three rungs, each a training run of its own in one MLflow experiment (siblings), evaluated the same way:

1. ``no-gram``: stage 1 with λ = 0 (the dual branch never runs): the plain reference-based backbone;
2. ``gram``: stage 1 with the Gram loss (λ = 0 for the first third of the steps, then the config's);
3. ``gram-plugin``: stage 2 (the published plug-in: ReferenceNet + background LoRA, rank 4) trained on top
   of rung 2's export; its training data needs the stage-2 columns (``--latent-views target,background``).

Each rung gets the Table 1 metrics (:mod:`pipelines.evaluation.protocol`) and the spatial-entanglement measures
(:mod:`pipelines.evaluation.entanglement`): the mean squared distance between the Gram matrices of the aligned and
the misaligned branch (lower: the misaligned reference disturbs the structure less) and the agreement of
the output's lines with the sketch when the reference comes from another image (higher: the output
follows the sketch rather than the reference). The plugin rung shares rung 2's U-Net, so its Gram
distance equals rung 2's by construction; its line agreement is measured with the plugin on.

A difference between two rungs means something only if it is larger than what the training seed alone
moves. So the whole ladder runs once per training seed (``seeds``; ``<out>/seed<k>/<rung>``, MLflow runs
``<name>-<rung>-seed<k>``), the evaluation keeps one seed for every run (the same samples and noise), and the
table gives each rung's mean ± standard deviation over the seeds, then says for each pair of neighbouring
rungs and each measure whether the means differ by more than the two spreads together.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlflow

from model.colorizer import Colorizer, is_model_folder
from pipelines.data.batches import check_dataset_for
from pipelines.data.layout import finished_manifest, read_all
from pipelines.evaluation.entanglement import spatial_entanglement
from pipelines.evaluation.metrics import table1_arrow
from pipelines.evaluation.mlflow_report import log_to_mlflow
from pipelines.evaluation.protocol import EvaluationConfig, evaluate
from pipelines.training.loop import TrainConfig
from pipelines.training.trainer import WorkerResources, make_trainer
from pipelines.training.tracking import find_training_run, training_record


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a training run and what it starts from."""

    name: str
    stage: str  # "backbone" or "plugin"
    starts_from: str  # "base" or another rung's name
    gram_weight: float | None  # None = the model config's
    description: str


LADDER = (
    Rung("no-gram", "backbone", "base", 0.0, "stage 1 without the Gram loss"),
    Rung("gram", "backbone", "base", None, "stage 1 with the Gram loss"),
    Rung("gram-plugin", "plugin", "gram", None, "stage 1 with the Gram loss + stage 2 plug-in (ReferenceNet + background LoRA)"),
)


@dataclass(frozen=True)
class AblationSettings:
    """One ablation: the training budget of every rung and where things go."""

    model: str  # the base model folder every stage-1 rung starts from
    data: str  # training dataset
    eval_data: str  # held-out dataset for the metrics and the entanglement measures
    out: str  # rung exports go to <out>/<rung>
    name: str = "ablation"  # run names: <name>-<rung>
    experiment: str = "ablation"
    train_steps: int = 1000  # stage-1 steps per backbone rung
    plugin_train_steps: int = 250
    rungs: tuple[str, ...] = tuple(r.name for r in LADDER)
    seeds: tuple[int, ...] = (0,)  # training seeds: the whole ladder runs once per seed

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)}: give one or more distinct training seeds")

    def rung_names(self) -> list[str]:
        unknown = set(self.rungs) - {r.name for r in LADDER}
        if unknown:
            raise ValueError(f"unknown rungs {sorted(unknown)}; the ladder is {[r.name for r in LADDER]}")
        chosen = [r for r in LADDER if r.name in self.rungs]
        for rung in chosen:  # a rung needs the export of the one it starts from
            if rung.starts_from == "base" or rung.starts_from in self.rungs:
                continue
            missing = [self.export(rung.starts_from, seed) for seed in self.seeds
                       if not is_model_folder(self.export(rung.starts_from, seed))]
            if missing:
                raise ValueError(f"rung {rung.name} starts from {rung.starts_from}, which is neither chosen nor "
                                 f"already exported at {', '.join(missing)}")
        return [r.name for r in chosen]

    def export(self, rung: str, seed: int) -> str:
        return str(Path(self.out) / f"seed{seed}" / rung)

    def run_name(self, rung: str, seed: int) -> str:
        return f"{self.name}-{rung}-seed{seed}"

    def start_of(self, rung: Rung, seed: int) -> str:
        return self.model if rung.starts_from == "base" else self.export(rung.starts_from, seed)

    def rung_config(self, rung: Rung, seed: int, **training) -> TrainConfig:
        """The rung's training run at one training seed; ``training`` holds the budget every rung shares
        (batch size, lr, MLflow store, checkpoint cadence: :class:`TrainConfig`'s fields)."""
        return TrainConfig(stage=rung.stage, model=self.start_of(rung, seed), dataset=self.data,
                           export=self.export(rung.name, seed), run_name=self.run_name(rung.name, seed),
                           mlflow_experiment=self.experiment, gram_weight=rung.gram_weight, seed=seed,
                           steps=self.train_steps if rung.stage == "backbone" else self.plugin_train_steps, **training)


def rung(name: str) -> Rung:
    return next(r for r in LADDER if r.name == name)


@dataclass
class RungResult:
    """What one rung measured at one training seed, and where its runs are."""

    rung: str
    seed: int
    description: str
    export: str
    training_run: str | None
    evaluation_run: str | None
    metrics: dict[str, float]  # Table 1 keys of the evaluation report (substitutes named in the key)
    labels: dict[str, str]
    entanglement: dict = field(default_factory=dict)


ENTANGLEMENT_COLUMNS = (("gram_distance", "Gram distance↓"), ("line_agreement", "Line agreement (misaligned)↑"),
                        ("line_agreement_aligned", "Line agreement (aligned)"))
ENTANGLEMENT_DIRECTIONS = {"gram_distance": "min", "line_agreement": "max"}  # the aligned agreement is a baseline


@dataclass(frozen=True)
class Spread:
    """One measure of one rung over the training seeds: mean and sample standard deviation (0 with one seed)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def cell(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def measures_of(result: RungResult) -> dict[str, float]:
    """Every tabulated number of one run: the Table 1 keys, then the entanglement measures."""
    return dict(result.metrics) | {k: float(result.entanglement[k]) for k, _ in ENTANGLEMENT_COLUMNS}


def summarize(results: list[RungResult]) -> dict[str, dict[str, Spread]]:
    """rung → measure → spread over the seeds, rungs in ladder order."""
    by_rung: dict[str, list[RungResult]] = {}
    for r in results:
        by_rung.setdefault(r.rung, []).append(r)
    return {name: {key: Spread.of([measures_of(r)[key] for r in runs]) for key in measures_of(runs[0])}
            for name, runs in by_rung.items()}


def direction_of(key: str) -> str | None:
    if key in ENTANGLEMENT_DIRECTIONS:
        return ENTANGLEMENT_DIRECTIONS[key]
    if key in dict(ENTANGLEMENT_COLUMNS):
        return None
    return "min" if table1_arrow(key) == "↓" else "max"


def separations(summary: dict[str, dict[str, Spread]]) -> list[dict]:
    """For each pair of neighbouring rungs and each measure with a direction: the change of the mean, whether
    it is an improvement, and whether it exceeds the seed noise (|Δ mean| > std_a + std_b). With one seed
    there is no noise estimate, so nothing is called separated."""
    names, verdicts = list(summary), []
    for before, after in zip(names, names[1:]):
        for key, a in summary[before].items():
            direction = direction_of(key)
            if direction is None:
                continue
            b = summary[after][key]
            delta = b.mean - a.mean
            noise = a.std + b.std
            separated = min(a.n, b.n) > 1 and abs(delta) > noise
            verdicts.append({"from": before, "to": after, "measure": key, "delta": delta, "noise": noise,
                             "better": delta < 0 if direction == "min" else delta > 0, "separated": separated})
    return verdicts


def ablation_table(results: list[RungResult], caption: str) -> str:
    """Markdown: one row per rung (mean ± std over the seeds), Table 1 metrics then the entanglement
    measures, then what separates beyond the seed noise."""
    summary = summarize(results)
    first = results[0]
    keys = list(first.labels)
    header = (["Rung", "What", "Seeds"] + [first.labels[k] + table1_arrow(k) for k in keys]
              + [label for _, label in ENTANGLEMENT_COLUMNS])
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: |" + " ---: |" * (len(header) - 3)]
    for name, spreads in summary.items():
        cells = [spreads[k].cell() for k in keys] + [spreads[k].cell() for k, _ in ENTANGLEMENT_COLUMNS]
        runs = [r for r in results if r.rung == name]
        seeds = ", ".join(str(r.seed) for r in runs)
        lines.append(f"| {name} | {runs[0].description} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "**Beyond seed noise?** (|Δ mean| > std₁ + std₂ between neighbouring rungs)", ""]
    verdicts = separations(summary)
    if not verdicts or min(s.n for spreads in summary.values() for s in spreads.values()) < 2:
        lines.append("- Not assessed: one training seed per rung gives no estimate of the seed noise "
                     "(run with `--seeds 0 1 2`).")
    else:
        labels = dict(first.labels) | dict(ENTANGLEMENT_COLUMNS)
        for v in verdicts:
            word = "within seed noise"
            if v["separated"]:
                word = "separated, better" if v["better"] else "separated, worse"
            lines.append(f"- {v['from']} → {v['to']}, {labels[v['measure']]}: Δ {v['delta']:+.4f} "
                         f"(noise {v['noise']:.4f}): {word}")
    return "\n".join(lines) + f"\n\n*{caption}*\n"


def write_results(out: str, results: list[RungResult], markdown: str) -> dict[str, Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "ablation.md", "json": folder / "ablation.json"}
    paths["markdown"].write_text(markdown)
    summary = {name: {k: asdict(v) for k, v in spreads.items()} for name, spreads in summarize(results).items()}
    paths["json"].write_text(json.dumps({"runs": [asdict(r) for r in results], "summary": summary,
                                         "separations": separations(summarize(results))}, indent=2))
    return paths


# ------------------------------------------------------------------------------------------- running
def train_rung(settings: AblationSettings, name: str, seed: int, resources: WorkerResources, storage: str,
               **training) -> None:
    """Train one rung at one seed with the same trainer as ``jobs/train.py`` (skipped when its export exists)."""
    export = settings.export(name, seed)
    if is_model_folder(export):
        print(f"[ablate] {name} (seed {seed}): already exported at {export}", flush=True)
        return
    cfg = settings.rung_config(rung(name), seed, **training)
    print(f"[ablate] {name} (seed {seed}): training {cfg.stage} for {cfg.steps} steps from {cfg.model}", flush=True)
    make_trainer(cfg, resources, storage=storage).fit()


def measure_rung(settings: AblationSettings, name: str, seed: int, config: EvaluationConfig, runner, pairs: int,
                 tracking: str) -> RungResult:
    """Table 1 metrics and the entanglement measures of one rung's export at one training seed, logged to
    MLflow. The evaluation's own seed (``config.seed``) is the same for every run."""
    export = settings.export(name, seed)
    # Table 1 is scored without the plug-in (evaluate's default); the plug-in rung is the one measured with it
    with_plugin = rung(name).stage == "plugin"
    report = evaluate(export, settings.eval_data, replace(config, method=name, plugin=with_plugin), runner=runner)
    report.write(Path(settings.out) / "eval" / f"seed{seed}" / name)
    evaluation_run = log_to_mlflow(report, export, tracking_uri=tracking, experiment=settings.experiment)

    rows = read_all(settings.eval_data, columns=["image", "sketches", "sketch_extractors"]).slice(0, pairs).to_pylist()
    model = Colorizer.from_pretrained(export)
    entanglement = spatial_entanglement(model, rows, seed=config.seed, steps=config.steps).to_json()
    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(settings.experiment)
    training_run = find_training_run(client, experiment.experiment_id, training_record(export))
    for target in filter(None, (training_run, evaluation_run)):
        for key in ("gram_distance", "line_agreement", "line_agreement_aligned"):
            client.log_metric(target, f"entanglement/{key}", float(entanglement[key]))
    return RungResult(rung=name, seed=seed, description=rung(name).description, export=export,
                      training_run=training_run,
                      evaluation_run=evaluation_run, metrics=report.metrics, labels=report.labels,
                      entanglement=entanglement)


def run_ablation(settings: AblationSettings, evaluation: EvaluationConfig, resources: WorkerResources, *,
                 tracking: str, storage: str, batch_size: int, lr: float = 1e-5,
                 entanglement_pairs: int = 8, runner=None) -> tuple[list[RungResult], str]:
    """Train, then measure, every chosen rung at every training seed (Ray must already be initialized);
    write and return the table. ``runner`` spreads the evaluation over Ray Data actors (None: in this
    process)."""
    names = settings.rung_names()
    if entanglement_pairs < 2:
        raise ValueError(f"--entanglement-pairs {entanglement_pairs}: the measures need at least 2 pairs "
                         "(each sketch is paired with another image's reference)")
    evaluation.choices()  # a missing extractor stops the ablation before any training
    for name in names:  # and so does training data without what a rung's stage reads
        check_dataset_for(rung(name).stage, finished_manifest(settings.data), settings.data)
    for seed in settings.seeds:
        for name in names:
            train_rung(settings, name, seed, resources, storage, batch_size=batch_size, lr=lr,
                       mlflow_tracking_uri=tracking, checkpoint_every=max(1, settings.train_steps // 4),
                       sample_every=0)
    results = [measure_rung(settings, name, seed, evaluation, runner, entanglement_pairs, tracking)
               for name in names for seed in settings.seeds]
    budget = f"{settings.train_steps} stage-1 steps per backbone rung, {settings.plugin_train_steps} plugin steps"
    seeds = f"training seeds {', '.join(map(str, settings.seeds))}: mean ± sample std" if len(settings.seeds) > 1 \
        else f"one training seed ({settings.seeds[0]})"
    caption = (f"{budget}, {resources.workers} worker(s) × batch {batch_size}, {seeds}; evaluated on "
               f"{settings.eval_data} ({len(names)} rungs, the same samples and evaluation seed {evaluation.seed} "
               f"for each). Entanglement over "
               f"{entanglement_pairs} held-out pairs: Gram distance between the aligned and misaligned branches; "
               f"line agreement = F-score of the output's lines against the sketch, with another image's reference "
               f"(misaligned) and with the image's own (aligned).")
    markdown = ablation_table(results, caption)
    write_results(settings.out, results, markdown)
    return results, markdown
