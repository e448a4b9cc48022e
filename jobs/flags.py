"""Command-line flags shared by the jobs, so one flag name means one thing in every job.

Each ``add_*`` function adds one group of flags to a parser; the jobs compose the groups they need. The
conventions (the README's table lists every flag):

- ``--model`` is a model folder read, ``--data`` a dataset read, ``--out`` what the job writes;
- ``--train-steps`` counts optimizer steps, ``--steps`` sampling steps (as the HTTP API's ``steps``);
- ``--mlflow-uri`` defaults to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
  directory, made absolute so Ray workers agree (:func:`pipelines.training.tracking.tracking_uri`);
- a job that cannot do what it was asked exits with ``<job>: <reason>`` on stderr and status 1
  (:func:`job_errors`); argparse's own usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

from pipelines.training.tracking import DEFAULT_EXPERIMENT


def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """A job's parser: its module docstring (with the ``ray job submit`` examples) as the description."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``1024`` → (1024, 1024); ``1152x896`` → (1152, 896) as (width, height)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}")
    return (values[0], values[-1])


def parse_pairs(values: list[str]) -> dict[str, str]:
    """``["a=x", "b=y"]`` → ``{"a": "x", "b": "y"}`` (repeatable ``NAME=PATH`` flags)."""
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
        pairs[name] = path
    return pairs


def add_mlflow(p: argparse.ArgumentParser, experiment: str | None = DEFAULT_EXPERIMENT,
               experiment_help: str = "MLflow experiment") -> None:
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    p.add_argument("--experiment", default=experiment, help=experiment_help + (f" (default: {experiment})"
                                                                                if experiment else ""))


def add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")


def add_workers(p: argparse.ArgumentParser, what: str = "Ray Train workers") -> None:
    p.add_argument("--workers", type=int, default=1, help=what)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 in training)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)


def workers_from(args: argparse.Namespace):
    """The :class:`WorkerResources` of :func:`add_workers`' flags."""
    from pipelines.training.trainer import WorkerResources  # pulls in Ray Train: only jobs that train pay for it

    return WorkerResources(workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker)


def add_training(p: argparse.ArgumentParser) -> None:
    """The optimizer and schedule flags of a training stage (one rung of the ablation uses them too)."""
    p.add_argument("--train-steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="per worker")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="Ray Train storage_path, shared on clusters (default: per job)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures Ray Train recovers from")


def add_evaluation(p: argparse.ArgumentParser) -> None:
    """The Table 1 protocol's flags (``jobs/evaluate.py`` and the ablation's evaluation of every rung)."""
    from pipelines.evaluation.metrics import CLIP_EXTRACTORS, FID_EXTRACTORS  # torch: only for jobs that evaluate

    p.add_argument("--samples", type=int, default=None, help="rows to evaluate (default: all)")
    p.add_argument("--size", type=parse_size, default=None, help="N or WxH (default: each row's bucket size)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--fid-extractor", choices=FID_EXTRACTORS, default="inception")
    p.add_argument("--inception-weights", default=None, help="FID Inception state_dict (pt_inception-2015-12-05)")
    p.add_argument("--clip-extractor", choices=CLIP_EXTRACTORS, default="openclip")
    p.add_argument("--clip-weights", default=None, help="OpenCLIP checkpoint for the CLIP score")


def add_acceleration(p: argparse.ArgumentParser) -> None:
    """The inference switches of :mod:`model.acceleration` (all off on the CPU unless asked for)."""
    from model.acceleration import ATTENTION_BACKENDS, CHANNELS_LAST_PARTS, COMPILE_SCOPES

    g = p.add_argument_group("acceleration (model/acceleration.py)")
    g.add_argument("--compile", choices=COMPILE_SCOPES, default="off",
                   help="torch.compile the denoiser: blocks (regional, short compile) or unet (whole)")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    g.add_argument("--compile-cache", default=None, help="folder for the compile caches, kept across runs")
    g.add_argument("--channels-last", default=None, metavar="PARTS",
                   help=f"comma-separated among {','.join(CHANNELS_LAST_PARTS)}, or none "
                        "(default: unet on CUDA, none on the CPU)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="the SDPA kernel")


def acceleration_from(args: argparse.Namespace, device: str):
    """:class:`model.acceleration.Acceleration` from :func:`add_acceleration`'s flags, for ``device``."""
    from model.acceleration import Acceleration

    return Acceleration.from_flags(compile=args.compile, channels_last=args.channels_last,
                                   attention=args.attention, compile_mode=args.compile_mode,
                                   compile_cache=args.compile_cache, device=device)


@contextlib.contextmanager
def job_errors(job: str, *errors: type[BaseException]):
    """Turn the expected failures of a job (bad input, missing files) into ``<job>: <reason>`` and exit
    status 1, instead of a traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, *errors) as err:
        raise SystemExit(f"{job}: {err}") from err


def fit_and_print(job: str, make_trainer, args: argparse.Namespace) -> int:
    """The body of a training job: start or join Ray at ``--ray-address``, build the trainer with
    ``make_trainer(resources, storage, max_failures)`` (a ``functools.partial`` of the stage's trainer
    maker) inside :func:`job_errors`, so a bad model or dataset is a one-line refusal, fit it, and print
    one JSON line: the final metrics, the last checkpoint and the exported model folder."""
    import ray

    from pipelines.training.trainer import absolute

    with job_errors(job):
        ray.init(address=args.ray_address)
        try:
            result = make_trainer(workers_from(args), args.storage or "outputs/runs", args.max_failures).fit()
        finally:
            ray.shutdown()
    print(json.dumps({"metrics": result.metrics, "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
                      "model": absolute(args.out)}, default=str))
    return 0
