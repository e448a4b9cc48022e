"""Side-by-side comparison of MLflow runs: which params differ, how the metrics ended, how the losses went.

Plain functions over ``mlflow.MlflowClient``, so ``jobs/compare.py`` stays a thin shell and tests can
drive every step with a real sqlite store:

    client = open_store("sqlite:///mlflow.db")
    experiment = find_experiment(client, "colorize-xl")
    runs = select_runs(client, experiment.experiment_id, wanted=["xl-v1-backbone", "3f2a9c1e"])
    summaries = summarize_runs(client, runs)
    result = write_comparison(summaries, experiment.name, Path("outputs/comparison"))  # markdown, table, files

Training runs (``Tracker`` in :mod:`pipelines.training.tracking`) log params and per-step metrics; evaluation runs
(:mod:`pipelines.evaluation.mlflow_report`) tag the training run they measured with ``colorize.evaluates=<run id>`` and
their setting with ``colorize.eval.setting``. Their metrics are shown in that training run's column as
``eval/<setting>/<name>`` (the key the evaluation also logs onto the training run, so the two share a row),
so one row compares, say, FID at one setting across the ablation's runs. A standalone evaluation run (of
a model no run in the store trained, e.g. a baseline) is a column of its own, its metrics named the same way.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from pipelines.training.tracking import COMPARISON_KIND, EVALUATES_TAG, EVALUATION_KIND, KIND_TAG, SETTING_TAG

EVAL_PREFIX = "eval/"
LIVE_STATUSES = ("FINISHED", "RUNNING")  # what a default selection shows; FAILED/KILLED only when named
SHORT_ID = 8
MIN_ID_PREFIX = 6

# Which way is better, by the words of a metric's name: `diffusion_loss`, `eval/fid`, `ms_ssim`, `clip_score`.
LOWER_IS_BETTER_WORDS = frozenset({"loss", "fid", "kid", "lpips", "mse", "mae"})
HIGHER_IS_BETTER_WORDS = frozenset({"psnr", "ssim", "clip", "cosine", "accuracy"})
DIRECTION_BY_NAME = {"samples_per_s": "max", "gpu_memory_gib": "min",
                     # spatial entanglement (pipelines/evaluation/entanglement.py); line_agreement_aligned is a baseline
                     "gram_distance": "min", "line_agreement": "max"}
ARROWS = {"min": "↓", "max": "↑", None: ""}


# ------------------------------------------------------------------------------------------ records
@dataclass
class MetricSeries:
    """One metric of one run: values by step, one value per step, steps ascending."""

    key: str
    steps: list[int]
    values: list[float]
    source_run_id: str  # the run that logged it: the compared run itself or an evaluation run of it

    def final(self) -> tuple[int, float]:
        return self.steps[-1], self.values[-1]

    def best(self, direction: str) -> tuple[int, float] | None:
        """(step, value) of the lowest (``min``) or highest (``max``) finite value; the earliest step on ties."""
        finite = [(v, s) for s, v in zip(self.steps, self.values) if math.isfinite(v)]
        if not finite:
            return None
        pick = min if direction == "min" else max
        value = pick(v for v, _ in finite)
        return next(s for v, s in finite if v == value), value


@dataclass
class RunSummary:
    """What the comparison needs from one run, read once from the store."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, MetricSeries]
    evaluations: list[tuple[str, str]] = field(default_factory=list)  # (run id, run name) merged in as eval/...

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:SHORT_ID]})"


@dataclass
class TableRow:
    """One row of the comparison: a param, or one statistic (``final`` / ``best``) of a metric."""

    section: str  # "param" or "metric"
    name: str
    statistic: str  # "value" for params, "final" or "best" for metrics
    direction: str | None
    cells: list[str]  # as shown, one per run
    values: list[str | float | None]  # raw, one per run (None: the run has no such param or metric)
    steps: list[int | None]
    best: list[bool]  # which runs hold the best value of this row
    sources: list[str | None]  # the run that logged each metric value (an evaluation run for eval/*)

    @property
    def title(self) -> str:
        if self.section == "param":
            return self.name
        arrow = ARROWS[self.direction]
        return " ".join(part for part in (self.name, arrow, self.statistic if self.statistic != "value" else "")
                        if part)


@dataclass
class ComparisonTable:
    experiment: str
    runs: list[RunSummary]
    param_rows: list[TableRow]
    same_params: dict[str, str]  # params with one value in every run
    metric_rows: list[TableRow]


# ----------------------------------------------------------------------------------------- the store
def open_store(tracking_uri: str):
    """A client for ``tracking_uri``; refuses a sqlite path that does not exist, since MLflow would
    silently create an empty store there and the comparison would then say "no experiment"."""
    if tracking_uri.startswith("sqlite:///"):
        # sqlite:///relative.db is relative to the working directory, sqlite:////abs/path.db absolute
        path = Path(unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0]))
        if not path.is_file():
            raise LookupError(f"no MLflow store at {path.resolve()} (tracking URI {tracking_uri}); pass --mlflow-uri "
                              "or set MLFLOW_TRACKING_URI to the store the training runs logged to")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def find_experiment(client, name_or_id: str):
    """The experiment called ``name_or_id``, else the one with that id; a LookupError lists what exists."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name_or_id)
    if experiment is None and name_or_id.isdigit():
        try:
            experiment = client.get_experiment(name_or_id)
        except MlflowException:
            experiment = None
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in _all_pages(client.search_experiments))
        state = "no experiment" if experiment is None else "only a deleted experiment"
        raise LookupError(f"{state} named {name_or_id!r} in {client.tracking_uri}; "
                          f"experiments there: {', '.join(names) or 'none'}")
    return experiment


def _all_pages(search, **kwargs) -> list:
    """Every item of a paged MLflow search, following ``token`` until the last page."""
    items, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def search_runs(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """Active (not deleted) runs, oldest first; an invalid filter becomes a ValueError naming it."""
    from mlflow.exceptions import MlflowException

    try:
        return _all_pages(client.search_runs, experiment_ids=experiment_ids, filter_string=filter_string,
                          order_by=["attributes.start_time ASC"])
    except MlflowException as error:
        raise ValueError(f"MLflow rejected the filter {filter_string!r}: {error.message}") from error


def _is_auxiliary(run) -> bool:
    """Linked evaluation runs and comparison runs are shown through the runs they describe, not as columns."""
    tags = run.data.tags
    return EVALUATES_TAG in tags or tags.get(KIND_TAG) == COMPARISON_KIND


def _is_evaluation(run) -> bool:
    return EVALUATES_TAG in run.data.tags or run.data.tags.get(KIND_TAG) == EVALUATION_KIND


def select_runs(client, experiment_id: str, wanted: list[str] | None = None, filter_string: str = "") -> list:
    """The runs to compare, in column order.

    With ``wanted``: each entry is a run id, a unique id prefix (>= 6 characters, as the table prints
    8) or a run name, matched among the experiment's runs (narrowed by ``filter_string``), in the order
    given, any status. Without: every FINISHED or RUNNING run that is neither a linked evaluation run
    (shown with the run it evaluates) nor a comparison run, oldest first.
    """
    runs = search_runs(client, [experiment_id], filter_string)
    if not wanted:
        chosen = [r for r in runs if r.info.status in LIVE_STATUSES and not _is_auxiliary(r)]
        if not chosen:
            where = f" matching {filter_string!r}" if filter_string else ""
            raise LookupError(f"no finished or running runs{where} in experiment {experiment_id}")
        return chosen
    chosen, seen = [], set()
    for entry in wanted:
        try:
            run = _match_run(runs, entry)
        except LookupError as error:
            raise LookupError(f"{error} (searched experiment {experiment_id}"
                              f"{f' narrowed by {filter_string!r}' if filter_string else ''})") from None
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            chosen.append(run)
    return chosen


def _match_run(runs: list, entry: str):
    by_id = [r for r in runs if r.info.run_id == entry]
    if by_id:
        return by_id[0]
    by_name = [r for r in runs if r.info.run_name == entry]
    if not by_name and len(entry) >= MIN_ID_PREFIX:
        by_name = [r for r in runs if r.info.run_id.startswith(entry)]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        ids = ", ".join(f"{r.info.run_id} ({r.info.status})" for r in by_name)
        raise LookupError(f"{entry!r} matches {len(by_name)} runs: {ids}; pass one of the ids instead")
    names = sorted({r.info.run_name for r in runs if r.info.run_name})
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise LookupError(f"no run with id or name {entry!r}; run names there: {shown or 'none'}")


def evaluation_runs(client, run_ids: list[str]) -> dict[str, list]:
    """Finished or running evaluation runs per training run id, oldest first, found in any experiment
    (an evaluation job may log to an experiment of its own)."""
    experiment_ids = [e.experiment_id for e in _all_pages(client.search_experiments)]
    found = {}
    for run_id in run_ids:
        runs = search_runs(client, experiment_ids, f"tags.`{EVALUATES_TAG}` = '{run_id}'")
        found[run_id] = [r for r in runs if r.info.status in LIVE_STATUSES]
    return found


def metric_histories(client, run, rename=lambda key: key) -> dict[str, MetricSeries]:
    """Every metric of ``run`` as a series. A resumed training run logs the steps after its last checkpoint
    again; the latest value logged at a step wins, as that is the one the final model carries on from."""
    series = {}
    for key in sorted(run.data.metrics):
        latest: dict[int, tuple[int, float]] = {}
        for point in client.get_metric_history(run.info.run_id, key):
            if point.step not in latest or point.timestamp >= latest[point.step][0]:
                latest[point.step] = (point.timestamp, point.value)
        steps = sorted(latest)
        series[rename(key)] = MetricSeries(rename(key), steps, [latest[s][1] for s in steps], run.info.run_id)
    return series


def evaluation_metric_namer(run):
    """Maps an evaluation run's metric keys to ``eval/<setting>/<key>`` (``eval/<key>`` without a setting
    tag): the names :mod:`pipelines.evaluation.mlflow_report` gives the copies it logs onto the training run."""
    setting = run.data.tags.get(SETTING_TAG)
    prefix = f"{EVAL_PREFIX}{setting}/" if setting else EVAL_PREFIX
    return lambda key: key if key.startswith(EVAL_PREFIX) else prefix + key


def summarize_runs(client, runs: list) -> list[RunSummary]:
    """Params and metric histories of ``runs``, with the metrics of their evaluation runs merged in as
    ``eval/<setting>/<name>`` (a later evaluation replaces an earlier one's value of the same metric, and
    the evaluation run's own value replaces the copy on the training run, naming its source)."""
    evaluations = evaluation_runs(client, [r.info.run_id for r in runs])
    summaries = []
    for run in runs:
        namer = evaluation_metric_namer(run) if _is_evaluation(run) else (lambda key: key)
        summary = RunSummary(run.info.run_id, run.info.run_name or run.info.run_id[:SHORT_ID], run.info.status,
                             dict(run.data.params), metric_histories(client, run, namer))
        for evaluation in evaluations[run.info.run_id]:
            summary.metrics.update(metric_histories(client, evaluation, evaluation_metric_namer(evaluation)))
            summary.evaluations.append((evaluation.info.run_id, evaluation.info.run_name))
        summaries.append(summary)
    return summaries


# ----------------------------------------------------------------------------------------- the table
def metric_direction(name: str) -> str | None:
    """``min`` or ``max`` for metrics whose better direction is known, None for schedules and counters."""
    base = name.rsplit("/", 1)[-1].lower()
    if base in DIRECTION_BY_NAME:
        return DIRECTION_BY_NAME[base]
    words = set(base.replace("-", "_").split("_"))
    if words & LOWER_IS_BETTER_WORDS:
        return "min"
    if words & HIGHER_IS_BETTER_WORDS:
        return "max"
    return None


def differing_params(runs: list[RunSummary]) -> tuple[list[str], dict[str, str]]:
    """Param names whose value (or presence) differs between runs, and the params every run shares."""
    names = sorted(set().union(*(r.params for r in runs)))
    differ = [n for n in names if len({r.params.get(n) for r in runs}) > 1]
    same = {n: runs[0].params[n] for n in names if n not in differ}
    return differ, same


def _format(value: float) -> str:
    return f"{value:.5g}"


def _marks(values: list[float | None], direction: str | None) -> list[bool]:
    """Which entries hold the best finite value; nothing is marked without a direction, with fewer than two
    values to compare, or when they are all equal (a tie everywhere is no winner)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if direction is None or len(finite) < 2 or len(set(finite)) == 1:
        return [False] * len(values)
    target = min(finite) if direction == "min" else max(finite)
    return [v == target for v in values]


def _metric_order(name: str) -> tuple:
    """Losses first, then evaluation metrics, then schedules and system metrics, each alphabetical."""
    if metric_direction(name) == "min" and "loss" in name and not name.startswith(EVAL_PREFIX):
        group = 0
    elif name.startswith(EVAL_PREFIX):
        group = 1
    else:
        group = 2
    return group, name != "loss", name


def metric_rows(runs: list[RunSummary]) -> list[TableRow]:
    """A ``final`` row per metric; a ``best`` row (value @ step) too where a direction is known and some
    run has more than one point, since otherwise best and final are the same numbers."""
    rows = []
    for name in sorted(set().union(*(r.metrics for r in runs)), key=_metric_order):
        series = [r.metrics.get(name) for r in runs]
        direction = metric_direction(name)
        finals = [s.final() if s else None for s in series]
        values = [f[1] if f else None for f in finals]
        sources = [s.source_run_id if s else None for s in series]
        rows.append(TableRow("metric", name, "final", direction,
                             [_format(f[1]) if f else "—" for f in finals], values,
                             [f[0] if f else None for f in finals], _marks(values, direction), sources))
        if direction and any(s and len(s.steps) > 1 for s in series):
            bests = [s.best(direction) if s else None for s in series]
            values = [b[1] if b else None for b in bests]
            rows.append(TableRow("metric", name, "best", direction,
                                 [f"{_format(b[1])} @ {b[0]}" if b else "—" for b in bests], values,
                                 [b[0] if b else None for b in bests], _marks(values, direction), sources))
    return rows


def build_table(runs: list[RunSummary], experiment: str) -> ComparisonTable:
    if not runs:
        raise ValueError("nothing to compare: no runs selected")
    differ, same = differing_params(runs)
    param_rows = [TableRow("param", n, "value", None, [r.params.get(n, "—") for r in runs],
                           [r.params.get(n) for r in runs], [None] * len(runs), [False] * len(runs),
                           [None] * len(runs))
                  for n in differ]
    return ComparisonTable(experiment, runs, param_rows, same, metric_rows(runs))


def _markdown_grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table padded to equal column widths, so it also reads well in a terminal."""
    header, rows = [c.replace("|", "\\|") for c in header], [[c.replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def _shown(row: TableRow) -> list[str]:
    return [f"**{c}**" if best else c for c, best in zip(row.cells, row.best)]


def render_markdown(table: ComparisonTable, value_width: int = 40) -> str:
    """The report: run list, params that differ (shared ones in one line), metrics, evaluation sources."""
    runs = table.runs
    header = [r.label for r in runs]
    lines = [f"# Comparison of {len(runs)} runs in experiment `{table.experiment}`", ""]
    lines += [f"- {r.label}: {r.status}, id `{r.run_id}`" for r in runs] + [""]
    total = len(table.param_rows) + len(table.same_params)
    lines += [f"## Params that differ ({len(table.param_rows)} of {total})", ""]
    if table.param_rows:
        lines += _markdown_grid(["param", *header], [[row.title, *row.cells] for row in table.param_rows])
    else:
        lines.append("None: every run has the same params.")
    if table.same_params:
        shared = ", ".join(f"{k}={_clip(v, value_width)}" for k, v in table.same_params.items())
        lines += ["", f"Same in every run ({len(table.same_params)}): {shared}"]
    lines += ["", "## Metrics", "",
              "↓ lower is better, ↑ higher is better, **bold** = the best run of the row (no arrow: no better "
              "direction, no mark). final = value at the last logged step; best = min or max over the run's "
              "history @ its step. eval/<setting>/* = metrics of the evaluation runs that tag a run with "
              f"`{EVALUATES_TAG}` (listed below).", ""]
    if table.metric_rows:
        lines += _markdown_grid(["metric", *header], [[row.title, *_shown(row)] for row in table.metric_rows])
    else:
        lines.append("No metrics logged.")
    evaluated = [r for r in runs if r.evaluations]
    if evaluated:
        lines += ["", "Evaluation runs merged in:"]
        lines += [f"- {r.label} ← " + ", ".join(f"{name} ({rid[:SHORT_ID]})" for rid, name in r.evaluations)
                  for r in evaluated]
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


CSV_COLUMNS = ("section", "name", "statistic", "direction", "run_id", "run_name", "value", "step", "is_best",
               "source_run_id")


def write_csv(table: ComparisonTable, path: Path) -> Path:
    """The table in long form (one line per row and run, full precision) for scripts and spreadsheets."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in [*table.param_rows, *table.metric_rows]:
            for run, value, step, best, source in zip(table.runs, row.values, row.steps, row.best, row.sources):
                writer.writerow([row.section, row.name, row.statistic, row.direction or "", run.run_id, run.name,
                                 "" if value is None else (repr(value) if isinstance(value, float) else value),
                                 "" if step is None else step, int(best), source or ""])
    return path


# ----------------------------------------------------------------------------------------- the plots
@dataclass(frozen=True)
class PlotGroup:
    """One PNG: these metrics as stacked subplots sharing the step axis, every run overlaid."""

    file_name: str
    title: str
    metrics: tuple[str, ...]
    smooth: bool  # noisy per-step values: faint raw line plus an EMA; schedules are drawn as they are


PLOT_GROUPS = (
    PlotGroup("loss_curves.png", "Training losses", ("loss", "diffusion_loss", "gram_loss"), smooth=True),
    PlotGroup("schedules.png", "Schedules", ("lr", "gram_weight"), smooth=False),
    PlotGroup("throughput.png", "Throughput and memory", ("samples_per_s", "gpu_memory_gib"), smooth=True),
)


def ema(values: list[float], factor: float) -> list[float]:
    """Exponential moving average with start-up bias removed (as TensorBoard smooths), so the first
    points are not dragged towards zero; non-finite values are skipped and repeat the last average."""
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"the smoothing factor must be in [0, 1), got {factor}")
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = factor * average + (1.0 - factor) * value
            weight = factor * weight + (1.0 - factor)
        smoothed.append(average / weight if weight else float("nan"))
    return smoothed


def eval_curve_group(runs: list[RunSummary]) -> PlotGroup | None:
    """Evaluation metrics logged at more than one step (e.g. FID per checkpoint) get a PNG of their own."""
    names = sorted({n for r in runs for n, s in r.metrics.items() if n.startswith(EVAL_PREFIX) and len(s.steps) > 1})
    return PlotGroup("eval_curves.png", "Evaluation metrics", tuple(names), smooth=False) if names else None


def plot_group(runs: list[RunSummary], group: PlotGroup, path: Path, smoothing: float) -> Path | None:
    """Draw ``group`` for ``runs`` into ``path`` (PNG); None when no run logged any of its metrics."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    present = [m for m in group.metrics if any(m in r.metrics for r in runs)]
    if not present:
        return None
    colors = _run_colors(len(runs))
    figure = Figure(figsize=(9, 2.6 * len(present) + 0.8), dpi=110, layout="constrained")
    axes = figure.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, present):
        for run, color in zip(runs, colors):
            series = run.metrics.get(name)
            if series is None:
                continue
            marker = "o" if len(series.steps) <= 50 else None  # sparse points (evaluations) stay visible
            if group.smooth and len(series.steps) > 1:
                ax.plot(series.steps, series.values, color=color, alpha=0.3, linewidth=1)
                ax.plot(series.steps, ema(series.values, smoothing), color=color, linewidth=2, label=run.label)
            else:
                ax.plot(series.steps, series.values, color=color, linewidth=2, marker=marker, label=run.label)
        arrow = ARROWS[metric_direction(name)]
        ax.set_ylabel(f"{name} {arrow}".strip())
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].legend(loc="best", fontsize="small")
    smoothing_note = f": faint = raw, bold = EMA (factor {smoothing:g})" if group.smooth else ""
    figure.suptitle(f"{group.title}{smoothing_note}")
    figure.savefig(path)
    return path


def _run_colors(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


# ---------------------------------------------------------------------------------------- everything
def write_comparison(runs: list[RunSummary], experiment: str, out: Path, smoothing: float = 0.9) -> dict:
    """Table (Markdown + CSV) and plots for ``runs`` under ``out``; returns the Markdown and the paths."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"--smoothing must be in [0, 1), got {smoothing}")
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(runs, experiment)
    markdown = render_markdown(table)
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    files = [out / "comparison.md", write_csv(table, out / "comparison.csv")]
    groups = [*PLOT_GROUPS, *filter(None, [eval_curve_group(runs)])]
    files += [p for p in (plot_group(runs, g, out / g.file_name, smoothing) for g in groups) if p]
    return {"markdown": markdown, "table": table, "files": files}


def log_comparison(client, experiment_id: str, runs: list[RunSummary], files: list[Path]) -> str:
    """Store the files as artifacts of a new run tagged ``colorize.kind=comparison`` (skipped by later
    default selections), for when the comparison should live next to the runs in ``mlflow ui``."""
    run = client.create_run(experiment_id, run_name="comparison",
                            tags={KIND_TAG: COMPARISON_KIND,
                                  "colorize.compared_runs": ",".join(r.run_id for r in runs)})
    try:
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id
