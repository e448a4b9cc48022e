"""The paper's ablation ladder as data: which runs, in which order, and how their results are tabulated.

Three rungs, each a training run of its own in one MLflow experiment (siblings), evaluated the same way:

1. ``no-gram``: stage 1 with λ = 0 (the dual branch never runs): the plain reference-based backbone;
2. ``gram``: stage 1 with the Gram loss (λ = 0 for the first third of the steps, then the config's);
3. ``gram-plugin``: stage 2 (plugin + split attention) trained on top of rung 2's export.

Each rung gets the Table 1 metrics (:mod:`pipelines.evaluation.protocol`) and the spatial-entanglement measures
(:mod:`pipelines.evaluation.entanglement`): the mean squared distance between the Gram matrices of the aligned and
the misaligned branch (lower: the misaligned reference disturbs the structure less) and the agreement of
the output's lines with the sketch when the reference comes from another image (higher: the output
follows the sketch rather than the reference). The plugin rung shares rung 2's U-Net, so its Gram
distance equals rung 2's by construction; its line agreement is measured with the plugin on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Rung:
    name: str
    stage: str  # "backbone" or "plugin"
    starts_from: str  # "base" or another rung's name
    gram_weight: float | None  # None = the model config's
    description: str


LADDER = (
    Rung("no-gram", "backbone", "base", 0.0, "stage 1 without the Gram loss"),
    Rung("gram", "backbone", "base", None, "stage 1 with the Gram loss"),
    Rung("gram-plugin", "plugin", "gram", None, "stage 1 with the Gram loss + stage 2 plugin"),
)


@dataclass
class AblationSettings:
    """One ablation: the training budget of every rung and where things go."""

    model: str  # the base model folder every stage-1 rung starts from
    data: str  # training dataset
    eval_data: str  # held-out dataset for the metrics and the entanglement measures
    out: str  # rung exports go to <out>/<rung>
    name: str = "ablation"  # run names: <name>-<rung>
    experiment: str = "ablation"
    steps: int = 1000  # stage-1 steps per backbone rung
    plugin_steps: int = 250
    rungs: tuple[str, ...] = tuple(r.name for r in LADDER)

    def rung_names(self) -> list[str]:
        unknown = set(self.rungs) - {r.name for r in LADDER}
        if unknown:
            raise ValueError(f"unknown rungs {sorted(unknown)}; the ladder is {[r.name for r in LADDER]}")
        chosen = [r for r in LADDER if r.name in self.rungs]
        for rung in chosen:  # a rung needs the export of the one it starts from
            if rung.starts_from != "base" and rung.starts_from not in self.rungs and not (
                    Path(self.export(rung.starts_from)) / "config.json").is_file():
                raise ValueError(f"rung {rung.name} starts from {rung.starts_from}, which is neither chosen nor "
                                 f"already exported at {self.export(rung.starts_from)}")
        return [r.name for r in chosen]

    def export(self, rung: str) -> str:
        return str(Path(self.out) / rung)

    def start_of(self, rung: Rung) -> str:
        return self.model if rung.starts_from == "base" else self.export(rung.starts_from)

    def train_args(self, rung: Rung) -> list[str]:
        """The rung's ``jobs/train.py`` flags (budget and placement flags are added by the caller)."""
        args = ["--stage", rung.stage, "--model", self.start_of(rung), "--data", self.data,
                "--export", self.export(rung.name), "--run-name", f"{self.name}-{rung.name}",
                "--experiment", self.experiment,
                "--steps", str(self.steps if rung.stage == "backbone" else self.plugin_steps)]
        if rung.gram_weight is not None:
            args += ["--gram-weight", str(rung.gram_weight)]
        return args


def rung(name: str) -> Rung:
    return next(r for r in LADDER if r.name == name)


@dataclass
class RungResult:
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
    arrows = {"fid": "↓", "psnr": "↑", "ms_ssim": "↑", "clip_cosine": "↑"}
    keys = list(results[0].labels)
    header = (["Rung", "What"] + [results[0].labels[k] + next(a for p, a in arrows.items() if k.startswith(p))
                                   for k in keys] + [label for _, label in ENTANGLEMENT_COLUMNS])
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
