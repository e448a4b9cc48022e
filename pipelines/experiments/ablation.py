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
"""

from __future__ import annotations

import json
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

    def rung_names(self) -> list[str]:
        unknown = set(self.rungs) - {r.name for r in LADDER}
        if unknown:
            raise ValueError(f"unknown rungs {sorted(unknown)}; the ladder is {[r.name for r in LADDER]}")
        chosen = [r for r in LADDER if r.name in self.rungs]
        for rung in chosen:  # a rung needs the export of the one it starts from
            if rung.starts_from != "base" and rung.starts_from not in self.rungs and not is_model_folder(
                    self.export(rung.starts_from)):
                raise ValueError(f"rung {rung.name} starts from {rung.starts_from}, which is neither chosen nor "
                                 f"already exported at {self.export(rung.starts_from)}")
        return [r.name for r in chosen]

    def export(self, rung: str) -> str:
        return str(Path(self.out) / rung)

    def start_of(self, rung: Rung) -> str:
        return self.model if rung.starts_from == "base" else self.export(rung.starts_from)

    def rung_config(self, rung: Rung, **training) -> TrainConfig:
        """The rung's training run; ``training`` holds the budget every rung shares (batch size, lr, seed,
        MLflow store, checkpoint cadence: :class:`TrainConfig`'s fields)."""
        return TrainConfig(stage=rung.stage, model=self.start_of(rung), dataset=self.data,
                           export=self.export(rung.name), run_name=f"{self.name}-{rung.name}",
                           mlflow_experiment=self.experiment, gram_weight=rung.gram_weight,
                           steps=self.train_steps if rung.stage == "backbone" else self.plugin_train_steps, **training)


def rung(name: str) -> Rung:
    return next(r for r in LADDER if r.name == name)


@dataclass
class RungResult:
    """What one rung measured, and where its runs are."""

    rung: str
    description: str
    export: str
    training_run: str | None
    evaluation_run: str | None
    metrics: dict[str, float]  # Table 1 keys of the evaluation report (substitutes named in the key)
    labels: dict[str, str]
    entanglement: dict = field(default_factory=dict)


ENTANGLEMENT_COLUMNS = (("gram_distance", "Gram distance↓"), ("line_agreement", "Line agreement (misaligned)↑"),
                        ("line_agreement_aligned", "Line agreement (aligned)"))


def ablation_table(results: list[RungResult], caption: str) -> str:
    """Markdown: one row per rung, Table 1 metrics then the entanglement measures."""
    keys = list(results[0].labels)
    header = (["Rung", "What"] + [results[0].labels[k] + table1_arrow(k) for k in keys]
              + [label for _, label in ENTANGLEMENT_COLUMNS])
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for r in results:
        cells = [f"{r.metrics[k]:.3f}" for k in keys] + [f"{r.entanglement[k]:.4f}" for k, _ in ENTANGLEMENT_COLUMNS]
        lines.append(f"| {r.rung} | {r.description} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n*{caption}*\n"


def write_results(out: str, results: list[RungResult], markdown: str) -> dict[str, Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "ablation.md", "json": folder / "ablation.json"}
    paths["markdown"].write_text(markdown)
    paths["json"].write_text(json.dumps([asdict(r) for r in results], indent=2))
    return paths


# ------------------------------------------------------------------------------------------- running
def train_rung(settings: AblationSettings, name: str, resources: WorkerResources, storage: str,
               **training) -> None:
    """Train one rung with the same trainer as ``jobs/train.py`` (skipped when its export exists)."""
    if is_model_folder(settings.export(name)):
        print(f"[ablate] {name}: already exported at {settings.export(name)}", flush=True)
        return
    cfg = settings.rung_config(rung(name), **training)
    print(f"[ablate] {name}: training {cfg.stage} for {cfg.steps} steps from {cfg.model}", flush=True)
    make_trainer(cfg, resources, storage=storage).fit()


def measure_rung(settings: AblationSettings, name: str, config: EvaluationConfig, runner, pairs: int,
                 tracking: str) -> RungResult:
    """Table 1 metrics and the entanglement measures of one rung's export, logged to MLflow."""
    export = settings.export(name)
    # Table 1 is scored without the plug-in (evaluate's default); the plug-in rung is the one measured with it
    with_plugin = rung(name).stage == "plugin"
    report = evaluate(export, settings.eval_data, replace(config, method=name, plugin=with_plugin), runner=runner)
    report.write(Path(settings.out) / "eval" / name)
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
    return RungResult(rung=name, description=rung(name).description, export=export, training_run=training_run,
                      evaluation_run=evaluation_run, metrics=report.metrics, labels=report.labels,
                      entanglement=entanglement)


def run_ablation(settings: AblationSettings, evaluation: EvaluationConfig, resources: WorkerResources, *,
                 tracking: str, storage: str, batch_size: int, lr: float = 1e-5, seed: int = 0,
                 entanglement_pairs: int = 8, runner=None) -> tuple[list[RungResult], str]:
    """Train, then measure, every chosen rung (Ray must already be initialized); write and return the
    table. ``runner`` spreads the evaluation over Ray Data actors (None: in this process)."""
    names = settings.rung_names()
    if entanglement_pairs < 2:
        raise ValueError(f"--entanglement-pairs {entanglement_pairs}: the measures need at least 2 pairs "
                         "(each sketch is paired with another image's reference)")
    evaluation.choices()  # a missing extractor stops the ablation before any training
    for name in names:  # and so does training data without what a rung's stage reads
        check_dataset_for(rung(name).stage, finished_manifest(settings.data), settings.data)
    for name in names:
        train_rung(settings, name, resources, storage, batch_size=batch_size, lr=lr, seed=seed,
                   mlflow_tracking_uri=tracking, checkpoint_every=max(1, settings.train_steps // 4), sample_every=0)
    results = [measure_rung(settings, name, evaluation, runner, entanglement_pairs, tracking) for name in names]
    budget = f"{settings.train_steps} stage-1 steps per backbone rung, {settings.plugin_train_steps} plugin steps"
    caption = (f"{budget}, {resources.workers} worker(s) × batch {batch_size}; evaluated on {settings.eval_data} "
               f"({len(names)} rungs, the same samples and seed for each). Entanglement over "
               f"{entanglement_pairs} held-out pairs: Gram distance between the aligned and misaligned branches; "
               f"line agreement = F-score of the output's lines against the sketch, with another image's reference "
               f"(misaligned) and with the image's own (aligned).")
    markdown = ablation_table(results, caption)
    write_results(settings.out, results, markdown)
    return results, markdown
