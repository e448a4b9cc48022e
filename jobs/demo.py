"""`make demo`: the main job, end to end on a local Ray with the tiny preset.

Seven steps, each skipped when its output already exists:

1. make a synthetic corpus (with a few damaged files, as real corpora have) and a held-out one;
2. assemble the base model folder (tiny preset, random init; holds the frozen encoders);
3. preprocess both corpora with Ray Data (sketches, masks, tokens, latents → Parquet shards);
4. train stage 1 (backbone with the Gram loss) with Ray Train + DeepSpeed ZeRO-2 on two CPU workers,
5. then stage 2 (the plug-in: ReferenceNet + background LoRA), both tracked in MLflow (``outputs/demo/mlflow.db``);
6. evaluate the stage-2 model on the held-out set with the Table 1 protocol (Ray Data actors), logged to
   MLflow next to its training run, and the untrained colorizer (the same frozen encoders and VAE, the
   trainable parts at their random init) on the same pairs, so the demo measures what training bought;
7. serve it with Ray Serve and send one HTTP request: a dataset sketch after another image's reference;
   the returned PNG is saved (``--keep-serving`` leaves the app and its web page up; ``--no-serve`` skips it).

The whole chain is one MLflow trace (a span per step). A second run reuses every finished step, and starts
Ray only for a step that has work left. The base model starts from the shipped tiny assets (a trained VAE
and a pretrained colorizer), so the demo's picture and numbers mean something: it ends with what it
proves, measured in its own output (the trained model against the untrained one on the same validation
pairs: PSNR, MS-SSIM and the substitute FID; the held-out diffusion loss before and after each stage),
each next to the claim it checks. Every step calls the same typed functions as the job that does it on a
cluster (pipelines/, model/, serve/).

    python jobs/demo.py --out outputs/demo
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jobs import flags  # noqa: E402
from model.assembly import init_model  # noqa: E402
from model.colorizer import Colorizer, is_model_folder, read_config  # noqa: E402
from model.line_art import invert  # noqa: E402
from pipelines.data.layout import check_schema, read_all, read_manifest  # noqa: E402
from pipelines.data.ray_stream import run_preprocess  # noqa: E402
from pipelines.data.shards import PreprocessConfig  # noqa: E402
from pipelines.data.synthetic import write_corpus  # noqa: E402
from pipelines.evaluation.heldout import heldout_diffusion_loss  # noqa: E402
from pipelines.evaluation.mlflow_report import log_to_mlflow  # noqa: E402
from pipelines.evaluation.protocol import EvaluationConfig, evaluate  # noqa: E402
from pipelines.evaluation.ray_runner import ray_runner  # noqa: E402
from pipelines.training.loop import TrainConfig  # noqa: E402
from pipelines.training.trainer import WorkerResources, make_trainer  # noqa: E402
from pipelines.training.tracking import DEFAULT_EXPERIMENT, STAGE_TAG, training_run_filter  # noqa: E402
from serve.transport import use_grpc_proxies  # noqa: E402

RUN_NAME = "demo"
WORKERS = WorkerResources(workers=2, cpus_per_worker=0.5)  # two ZeRO-2 ranks on the laptop's two cores


def demo_pair(dataset: str) -> tuple[dict, bytes, bytes]:
    """The first row's sketch (as a drawing, PNG) and the last row's image as its reference (JPEG bytes)."""
    rows = read_all(dataset, columns=["source", "image", "sketches"]).to_pylist()
    sketch_row, reference_row = rows[0], rows[-1]
    drawing = invert(np.asarray(Image.open(io.BytesIO(sketch_row["sketches"][0]))))
    buffer = io.BytesIO()
    Image.fromarray(drawing).save(buffer, format="PNG")
    where = {"sketch_from": sketch_row["source"], "reference_from": reference_row["source"]}
    return where, buffer.getvalue(), reference_row["image"]


def serve_and_request(model_folder: str, dataset: str, out_dir: str, seed: int, steps: int, port: int,
                      keep_serving: bool) -> dict:
    """Deploy the Serve app of ``serve/app.py`` on the running local Ray, send one HTTP request with a dataset
    sketch and another image's reference, save the returned PNG and a sketch | reference | result strip."""
    import requests  # the client side of the demo's one HTTP request
    from ray import serve

    from serve.app import build_app  # Ray Serve deployments: imported only when the demo gets this far

    where, sketch_png, reference_jpeg = demo_pair(dataset)
    quiet = {"log_level": "WARNING"}  # Serve's INFO lines would bury the demo's report; they stay in Ray's log files
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    serve.run(build_app({"model": model_folder, "num_cpus": 1, "max_batch_size": 2}), name="colorize",
              route_prefix="/", logging_config=quiet)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/colorize", timeout=600, files={
        "sketch": ("sketch.png", sketch_png, "image/png"), "reference": ("reference.jpg", reference_jpeg, "image/jpeg"),
    }, data={"seed": str(seed), "steps": str(steps)})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"the served model answered HTTP {response.status_code}: {response.text}")
    out = Path(out_dir)
    result_path = out / "colorized.png"
    result_path.write_bytes(response.content)
    result = Image.open(result_path).convert("RGB")
    height = result.size[1]
    panels = [Image.open(io.BytesIO(sketch_png)).convert("RGB"), Image.open(io.BytesIO(reference_jpeg)).convert("RGB"),
              result]
    strip = np.concatenate([np.asarray(p.resize((p.size[0] * height // p.size[1], height))) for p in panels], axis=1)
    Image.fromarray(strip).save(out / "strip.png")
    parameters = {k[2:].lower().replace("-", "_"): v for k, v in response.headers.items() if k.lower().startswith("x-")}
    if keep_serving:
        print(f"[demo] serving at {url}/ (the artists' page; API docs at {url}/docs). Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    return {"image": str(result_path), "strip": str(out / "strip.png"), "size": list(result.size),
            "url": f"{url}/v1/colorize", "seconds": round(seconds, 3), "parameters": parameters, **where}


class TracedSteps:
    """The demo's steps as one MLflow trace (a span per step, with what it produced) and a timing table."""

    def __init__(self, tracking_uri: str, experiment: str, artifacts: Path):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if mlflow.get_experiment_by_name(experiment) is None:  # where the trainer would put it, too
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(experiment)
        self.timings: list[tuple[str, float, str]] = []
        self.root = None

    @contextlib.contextmanager
    def trace(self, **attributes):
        with self.mlflow.start_span(name="make demo") as root:
            root.set_attributes(attributes)
            self.root = root
            yield
        self.mlflow.flush_trace_async_logging()

    @contextlib.contextmanager
    def step(self, name: str, **attributes):
        """Yields a dict the step fills with its outputs (they become the span's outputs)."""
        outputs: dict = {}
        started = time.perf_counter()
        print(f"[demo] {len(self.timings) + 1}. {name}", flush=True)
        with self.mlflow.start_span(name=name) as span:
            span.set_attributes({k: str(v) for k, v in attributes.items()})
            yield outputs
            span.set_outputs(outputs)
        self.timings.append((name, time.perf_counter() - started, outputs.get("note", "")))

    @property
    def trace_id(self) -> str | None:
        return self.root.trace_id if self.root is not None else None


DERIVED = ("base", "untrained", "dataset", "val_dataset", "stage1", "stage2", "runs", "eval",
           "eval_untrained")  # what a rerun may reuse


def start_over_if_stale(out: Path) -> str | None:
    """Remove the reusable outputs of an older colorize-xl (a model folder or dataset of a format this code
    refuses), so a rerun after an upgrade rebuilds them instead of failing on them; the corpora and the
    MLflow store stay. Returns why, or ``None`` when everything there is current."""
    reason = None
    for name in ("base", "untrained", "stage1", "stage2"):
        if reason is None and is_model_folder(out / name):
            try:
                read_config(out / name)
            except ValueError as err:
                reason = str(err)
    for name in ("dataset", "val_dataset"):
        if reason is None and (out / name).is_dir():
            try:
                check_schema(str(out / name))
            except ValueError as err:
                reason = str(err)
    if reason is not None:
        for name in DERIVED:
            shutil.rmtree(out / name, ignore_errors=True)
    return reason


class LocalRay:
    """The demo's own local Ray ("local": never a cluster another process started on this machine), started
    by the first step that has work for it, so a rerun whose steps are all done (with ``--no-serve``) starts
    none and finishes in seconds."""

    def __init__(self):
        self.context = None

    def up(self) -> None:
        if self.context is not None:
            return
        # Ray Data's per-operator progress (from the training data splitters too) would bury the demo's own
        # lines; the dashboard is on because Ray Train's cleaner polls the state API it serves.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # for processes started from here on
        use_grpc_proxies()  # the serve step's proxy reaches the app over gRPC (serve/transport.py)
        ray.data.DataContext.get_current().enable_progress_bars = False  # this one imported Ray Data already
        self.context = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True)
        print(f"[demo] local Ray up; its dashboard: http://{self.context.dashboard_url}", flush=True)

    def down(self) -> None:
        if self.context is not None:
            ray.shutdown()
            self.context = None


def preprocess(corpus: Path, dataset: Path, base: Path, local_ray: LocalRay) -> dict:
    manifest = read_manifest(str(dataset)) or {}
    done_before = manifest.get("complete", False)
    if not done_before:
        local_ray.up()
        cfg = PreprocessConfig(preset="tiny", shard_size=8, encoders=str(base), latent_views=("target", "background"))
        manifest = run_preprocess(str(corpus), str(dataset), cfg)
    return {"dataset": str(dataset), "rows": manifest["rows"], "errors": manifest["errors"],
            "inputs": manifest["inputs"], "note": "already done, skipped" if done_before else ""}


def train_stage(stage: str, start: Path, dataset: Path, export: Path, steps: int, out: Path, tracking: str,
                validation: Path, local_ray: LocalRay) -> dict:
    """One stage with the same trainer as ``jobs/train.py`` (skipped when its export exists), and the
    held-out diffusion loss on ``validation`` before and after it, with the same noise draws."""
    outputs = {"export": str(export)}
    if is_model_folder(export):
        outputs["note"] = "already trained, skipped"
    else:
        local_ray.up()
        cfg = TrainConfig(stage=stage, model=str(start), dataset=str(dataset), export=str(export), steps=steps,
                          batch_size=2, checkpoint_every=max(1, steps // 2), sample_every=0,
                          log_every=max(1, steps // 4), run_name=RUN_NAME, mlflow_tracking_uri=tracking)
        result = make_trainer(cfg, WORKERS, storage=str(out / "runs")).fit()
        outputs |= {"steps": steps, "final_loss": result.metrics.get("loss")}
    before, after = (heldout_diffusion_loss(str(folder), str(validation), stage=stage, device="cpu")
                     for folder in (start, export))
    return outputs | {"heldout_loss_before": round(before, 5), "heldout_loss_after": round(after, 5)}


def untrained_counterpart(base: Path, folder: Path, seed: int) -> Path:
    """The colorizer before any training: ``base``'s frozen encoders and VAE, with the trainable parts (U-Net,
    sketch encoder, projector) at the preset's random init. Comparing against it isolates what training
    taught the colorizer; a random VAE as well would only show the VAE. Left as it is when it exists."""
    if is_model_folder(folder):
        return folder
    trained = Colorizer.from_pretrained(base)
    torch.manual_seed(seed)
    fresh = Colorizer(trained.config, vae=trained.vae, tagger=trained.tagger, clip=trained.clip)
    return fresh.save_pretrained(folder)


# What the demo claims, each checked on its own output: (label, metric key prefix, better when, margin).
CLAIMS = (("PSNR", "psnr", "higher", 6.0), ("MS-SSIM", "ms_ssim", "higher", 0.0), ("FID", "fid", "lower", 0.0))


def proof(untrained: dict, trained: dict, losses: dict[str, tuple[float, float]]) -> dict:
    """The demo's claims against its own numbers: the trained model beats the untrained one on the same
    validation pairs (PSNR by at least 6 dB; MS-SSIM higher; the substitute FID lower), and each listed
    (before, after) held-out diffusion loss went down."""
    checks = []
    for label, prefix, better, margin in CLAIMS:
        key = next(k for k in trained if k.startswith(prefix))
        label = label if key == prefix else f"{label} (substitute)"  # e.g. fid_substitute_model_vae
        change = trained[key] - untrained[key]
        holds = change >= margin if better == "higher" else change < -margin
        claim = (f"+{margin:g} or more" if better == "higher" else f"-{margin:g} or less") if margin else better
        checks.append({"measure": key, "label": f"{label}, untrained → demo model", "before": untrained[key],
                       "after": trained[key], "change": change, "claim": claim, "holds": bool(holds)})
    for label, (before, after) in losses.items():
        checks.append({"measure": "heldout_loss", "label": f"held-out diffusion loss, {label}", "before": before,
                       "after": after, "change": after - before, "claim": "lower", "holds": after < before})
    return {"checks": checks, "all_hold": all(c["holds"] for c in checks)}


def proof_table(result: dict) -> str:
    lines = ["| measure | before | after | change | claim | holds |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for c in result["checks"]:
        lines.append(f"| {c['label']} | {c['before']:.4f} | {c['after']:.4f} | {c['change']:+.4f} | {c['claim']} | "
                     f"{'yes' if c['holds'] else '**no**'} |")
    return "\n".join(lines)


def evaluate_model(model: Path, dataset: Path, out: Path, samples: int, steps: int, seed: int, tracking: str,
                   local_ray: LocalRay, name: str = "eval") -> dict:
    """The Table 1 protocol on the validation set, over Ray Data actors; reused when already measured.

    No Inception or CLIP weight files ship with the demo (nothing is downloaded), so it asks for the named
    substitutes: for FID the model's own VAE encoder (trained, where the tiny CLIP tower is random-init and
    its features ranked the untrained model's noise above trained outputs), for the CLIP score the model's
    CLIP tower; the table and every MLflow key say so."""
    config = EvaluationConfig(samples=samples, steps=steps, seed=seed, fid_extractor="substitute:vae",
                              clip_extractor="substitute:model", device="cpu", batch_size=4)
    folder = out / name
    if (folder / "metrics.json").is_file() and (folder / "metrics.md").is_file():
        saved = json.loads((folder / "metrics.json").read_text())
        fid, clip = config.choices()
        if (saved["settings"]["setting"] == config.setting(steps) and saved["settings"]["model"] == str(model)
                and saved.get("extractors") == {"fid": fid.label(), "clip": clip.label()}):  # not an older
            # demo's evaluation made with other extractors (its numbers would not compare)
            return {"metrics": saved["metrics"], "table": (folder / "metrics.md").read_text(),
                    "files": str(folder), "run": saved.get("mlflow_run"), "note": "already measured, reused"}
    local_ray.up()
    report = evaluate(str(model), str(dataset), config, runner=ray_runner(1, False, 1.0))
    run_id = log_to_mlflow(report, model, tracking_uri=tracking)
    report.write(folder)
    saved = json.loads((folder / "metrics.json").read_text()) | {"mlflow_run": run_id}
    (folder / "metrics.json").write_text(json.dumps(saved, indent=2))
    return {"metrics": report.metrics, "table": report.markdown(), "files": str(folder), "run": run_id}


def build_parser():
    parser = flags.parser_for(__doc__)
    parser.add_argument("--out", default="outputs/demo", help="where everything goes")
    parser.add_argument("--images", type=int, default=32, help="size of the synthetic training corpus")
    parser.add_argument("--val-images", type=int, default=8, help="size of the held-out validation corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps of the evaluation and the request")
    parser.add_argument("--train-steps", type=int, default=40, help="stage-1 steps (stage 2 runs a quarter)")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--port", type=int, default=8000, help="the Serve HTTP port (loopback only)")
    serving = parser.add_mutually_exclusive_group()
    serving.add_argument("--no-serve", action="store_true",
                         help="stop after the evaluation: no Serve app, no HTTP request (a headless check, a busy port)")
    serving.add_argument("--keep-serving", action="store_true",
                         help="leave the app up at the end (open http://127.0.0.1:PORT/ for the artists' page)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stale = start_over_if_stale(out)
    if stale:
        print(f"[demo] {out} holds outputs of an older colorize-xl, made again from the corpora: {stale}", flush=True)
    started = time.perf_counter()
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    chain = TracedSteps(tracking, DEFAULT_EXPERIMENT, out / "mlartifacts")
    corpus, val_corpus = out / "corpus", out / "val_corpus"
    dataset, val_dataset = out / "dataset", out / "val_dataset"
    stage1, stage2 = out / "stage1", out / "stage2"

    with chain.trace(out=str(out), preset="tiny", images=args.images, train_steps=args.train_steps):
        with chain.step("make a synthetic corpus (training, with damaged files; held-out validation)") as outputs:
            for folder, count, bad, seed in ((corpus, args.images, True, args.seed),
                                             (val_corpus, args.val_images, False, args.seed + 1)):
                if not folder.is_dir():
                    outputs[folder.name] = write_corpus(folder, count, bad, seed)
            outputs["note"] = "" if outputs else "already made, reused"
        with chain.step("assemble the base model folder (tiny preset, from the shipped tiny assets)") as outputs:
            outputs["model"] = str(init_model(out / "base", "tiny", seed=args.seed))
            outputs["untrained"] = str(untrained_counterpart(out / "base", out / "untrained", args.seed))
        local_ray = LocalRay()
        try:
            with chain.step("preprocess with Ray Data (sketches, masks, tokens, latents → Parquet)") as outputs:
                train_data = preprocess(corpus, dataset, out / "base", local_ray)
                val_data = preprocess(val_corpus, val_dataset, out / "base", local_ray)
                outputs.update(train_data | {"validation": val_data})
            with chain.step("train stage 1: backbone + Gram loss (Ray Train + DeepSpeed ZeRO-2, 2 workers)") as outputs:
                outputs.update(train_stage("backbone", out / "base", dataset, stage1, args.train_steps, out, tracking,
                                           val_dataset, local_ray))
                stage1_outputs = dict(outputs)
            with chain.step("train stage 2: plug-in = ReferenceNet + background LoRA (Ray Train + DeepSpeed ZeRO-2)") as outputs:
                outputs.update(train_stage("plugin", stage1, dataset, stage2, max(1, args.train_steps // 4), out,
                                           tracking, val_dataset, local_ray))
                learned = {"stage 1": stage1_outputs, "stage 2": dict(outputs)}
            with chain.step("evaluate on the validation set (Table 1 protocol, Ray Data actors), "
                            "and the untrained model on the same pairs") as outputs:
                evaluation = evaluate_model(stage2, val_dataset, out, args.eval_samples, args.steps, args.seed,
                                            tracking, local_ray)
                baseline = evaluate_model(out / "untrained", val_dataset, out, args.eval_samples, args.steps,
                                          args.seed, tracking, local_ray, name="eval_untrained")
                outputs.update({k: v for k, v in evaluation.items() if k != "table"})
                outputs["untrained_metrics"] = baseline["metrics"]
                untrained_loss = round(heldout_diffusion_loss(str(out / "untrained"), str(val_dataset),
                                                              stage="backbone", device="cpu"), 5)
            with chain.step("serve with Ray Serve and send one HTTP request") as outputs:
                if args.no_serve:
                    outputs["note"] = "skipped (--no-serve)"
                else:
                    local_ray.up()
                    outputs.update(serve_and_request(str(stage2), str(dataset), str(out), args.seed, args.steps,
                                                     args.port, args.keep_serving))
                colorized = {k: v for k, v in outputs.items() if k != "note"} or None
        finally:
            local_ray.down()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    training_runs = {r.data.tags.get(STAGE_TAG): r.info.run_id for r in client.search_runs(
        [experiment.experiment_id], filter_string=training_run_filter(RUN_NAME))}
    seconds = round(time.perf_counter() - started, 1)
    heldout = {stage: {"before": o["heldout_loss_before"], "after": o["heldout_loss_after"]} for stage, o in learned.items()}
    losses = {"untrained → stage 1": (untrained_loss, heldout["stage 1"]["after"])}
    losses |= {f"{stage} (from its start)": (v["before"], v["after"]) for stage, v in heldout.items()}
    proved = proof(baseline["metrics"], evaluation["metrics"], losses)
    models = {"base": str(out / "base"), "untrained": str(out / "untrained"), "stage1": str(stage1),
              "stage2": str(stage2)}
    summary = {"out": str(out), "dataset": train_data, "validation": val_data, "heldout_loss": heldout, "models": models,
        "mlflow": {"uri": tracking, "training_runs": training_runs, "evaluation_run": evaluation["run"],
                   "trace": chain.trace_id},
        "metrics": evaluation["metrics"], "untrained_metrics": baseline["metrics"],
        "untrained_heldout_loss": untrained_loss, "proof": proved,
        "colorized": colorized, "seconds": seconds,
        "steps": [{"step": n, "seconds": round(t, 1), "note": note} for n, t, note in chain.timings]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    width = max(len(n) for n, _, _ in chain.timings)
    print("\n[demo] what ran (one MLflow trace, id " + str(chain.trace_id) + "):")
    for name, took, note in chain.timings:
        print(f"  {name:<{width}}  {took:7.1f} s  {note}")
    print(f"  {'total':<{width}}  {seconds:7.1f} s")
    print(f"\n[demo] dataset: {dataset}: {train_data['rows']} rows + {train_data['errors']} errors = "
          f"{train_data['inputs']} inputs (errors with reasons in {dataset / 'errors'}); validation: {val_dataset} "
          f"({val_data['rows']} rows)")
    print(f"[demo] models: {stage1} (stage 1), {stage2} (stage 2)")
    print("[demo] held-out diffusion loss on the validation set (lower = learned; same samples and noise before "
          "and after):\n" + "\n".join(f"       {stage}: {v['before']:.4f} before → {v['after']:.4f} after "
                                      f"({(v['after'] - v['before']) / v['before']:+.1%})" for stage, v in heldout.items()))
    print(f"[demo] MLflow runs: {', '.join(f'{k} {v}' for k, v in training_runs.items())}; evaluation "
          f"{evaluation['run']}\n[demo] look at them: mlflow ui --backend-store-uri {tracking}")
    print(f"[demo] metrics ({evaluation['files']}):\n\n{evaluation['table']}")
    print(f"[demo] what the demo proves, on its own validation pairs ({args.eval_samples} samples, {args.steps} "
          f"sampling steps; the untrained model is {out / 'untrained'}):\n\n{proof_table(proved)}\n\n"
          f"[demo] {'every claim holds' if proved['all_hold'] else 'NOT every claim holds (see the table)'}\n")
    if colorized is not None:
        print(f"[demo] colorized image (from {colorized['url']}): {colorized['image']}\n"
              f"[demo] sketch | reference | result: {colorized['strip']}")
    print(f"[demo] summary: {out / 'summary.json'}\n"
          f"[demo] serve it again (CPU): serve run serve.app:build_app model={stage2} num_gpus=0 dtype=float32\n"
          f"       then open http://127.0.0.1:8000/ (the artists' page); on GPUs: serve run serve/config.yaml\n"
          f"[demo] on a cluster, the same jobs: see cluster/README.md, e.g. ray job submit --working-dir . -- "
          f"python jobs/preprocess.py --input s3://bucket/corpus --out s3://bucket/datasets/v1 "
          f"--encoders /mnt/shared/models/base")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
