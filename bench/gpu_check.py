"""Every headline figure of colorize-xl in one call on one GPU, next to the goals of
``../shared/docs/performance.md``: JSON lines as each part ends, then a Markdown table.

On one H100/H200, from a fresh checkout, in about 8 minutes (random-init weights at the full ``sdxl``
sizes; speed does not depend on weight values)::

    # here, once: the wheels the GPU image lacks go to .whl/ (git-ignored); the names given are what
    # colorize (torchsde) and the Serve app (fastapi ...) need beyond gpu-wheels.sh's own list
    bash ../shared/tools/gpu-wheels.sh torchsde==0.2.6 trampoline==0.1.2 fastapi==0.165.0 starlette==1.10.0 \\
        uvicorn==0.54.0 python-multipart==0.0.34 opentelemetry-api==1.45.2
    # there (the device tool: carry [".whl"]), one command:
    make gpu-check GPU_CHECK_ARGS="--markdown $OUT/gpu-check.md"

``make gpu-check`` is the wheels' install line of ``gpu-wheels.sh`` followed by this script; spelled out
(where ``make`` is missing)::

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site RAY_AUTH_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 \\
      && python3 bench/gpu_check.py --markdown $OUT/gpu-check.md

Parts, in this order, each in its own subprocess with its own time limit (``--limit PART=SECONDS``), so
that a failure, a crash or a hang of one is reported and the rest still run; the whole run keeps to
``--budget`` seconds (a part starts only if its minimum time is left, and is cut at what is left):

* ``colorize``: ``Colorizer.colorize`` (encoders + sampling + VAE decode) at 1024², 20 steps, dual guidance
  (reference 4.5, sketch 2.0: three U-Net evaluations a step), eager; then each switch of
  ``model/acceleration.py`` alone (channels_last for the U-Net, and with the VAE decoder; each SDPA kernel;
  float32 against bfloat16) at 3 steps against the plain model in the same process, as ratios;
* ``train``: ``bench/train.py`` at ``sdxl`` 1024², batch 8, gradient checkpointing: samples/s and peak
  memory with the Gram branch off (``plain``), ours (``fused``) and two full forwards (``naive``);
* ``encoder``: ``bench/preprocess.py --encoders-only``: WD tagger, CLIP, VAE encode and the three together;
* ``colorize_compiled``: as ``colorize``, with the denoiser under ``torch.compile`` (``--compile-scope``:
  the whole ``ColorizerUNet``, or each transformer and ResNet block); the compile time is what the two
  warm-up calls took beyond two compiled calls. A failing compile is reported in its line;
* ``model_folder``: a random-init model folder (built on the device at the run dtype), for the next two
  (the reduced run leaves it out unless ``--parts`` names it: they make their own tiny folders);
* ``serve``: ``bench/serve.py`` (library and Ray Serve): p50/p99 at concurrency 1 and 8, the latency Serve
  adds at 1 and its throughput against the library's ``colorize_batch`` at 8 (1024², ``--serve-steps``
  steps: fewer than 20 so that it fits; the overhead per request is what the goals bound);
* ``batch``: ``bench/colorize_batch.py`` if it exists, else reported missing: pairs/s of a plain
  ``colorize_batch`` loop and of the job (in this process and on Ray), with its ratios; the model folder,
  device, dtype and the serve part's size and steps are passed where its ``--help`` lists them
  (``--batch-args`` adds more).

``--reduced`` (chosen when no CUDA device is present) runs every part on the CPU with the ``tiny``
preset at tiny sizes, in well under 2 minutes on 2 cores, so that the check cannot rot: the figures are
then only a sign of life, and only the goals that hold on any machine (ratios) are judged. There the
compile part traces with ``torch.compile(backend="eager")`` (dynamo without code generation), which
the CPUs can afford.

Output: per part one ``{"bench": "gpu_check", "part": ...}`` line (status ``ok``, ``error``,
``timeout``, ``skipped`` or ``missing``, seconds, the headline figures and the part's own JSON records),
one ``"summary": true`` line with every table row, then the table (also to ``--markdown FILE``). Exit
status 1 when a part failed or timed out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("colorize", "train", "encoder", "colorize_compiled", "model_folder", "serve", "batch")
KILL_GRACE = 6.0  # seconds a part may take to end once its limit is reached (SIGTERM, then SIGKILL)
ANCHORS = "../shared/docs/performance.md (one H100, torch 2.11, bf16, random init, 2026-11-24)"
WEIGHTS = "random init at the preset's full sizes (speed does not depend on weight values)"
MODULES = ("torch", "diffusers", "open_clip", "timm", "torchsde", "ray", "fastapi", "starlette", "uvicorn",
           "python_multipart", "deepspeed")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class Setting:
    """Sizes of one run: the GPU figures, or the reduced CPU run."""

    reduced: bool
    device: str
    dtype: str
    preset: str
    size: int
    steps: int
    iters: int
    train_size: int
    train_batch: int
    train_iters: int
    encoder_batch: int
    serve_size: int
    serve_steps: int
    serve_requests: int
    serve_threads: int
    batch_pairs: int
    compile_backend: str
    switch_steps: int  # the colorize part also times each acceleration switch at this many steps
    switch_iters: int  # ... this many times (after one warm-up call)
    budget: float
    limits: dict[str, float]  # a part's time limit (seconds)
    minimums: dict[str, float]  # a part starts only if this much of the budget is left (or its whole limit)


def gpu_setting(args) -> Setting:
    return Setting(reduced=False, device="cuda", dtype="bfloat16", preset="sdxl", size=1024, steps=20, iters=3,
                   train_size=1024, train_batch=8, train_iters=3, encoder_batch=16, serve_size=1024,
                   serve_steps=args.serve_steps or 4, serve_requests=8, serve_threads=4, batch_pairs=16,
                   compile_backend=args.compile_backend or "inductor", switch_steps=3, switch_iters=2, budget=args.budget or 440,
                   limits={"colorize": 130, "train": 120, "encoder": 90, "colorize_compiled": 240,
                           "model_folder": 90, "serve": 180, "batch": 90},
                   minimums={"colorize": 30, "train": 40, "encoder": 30, "colorize_compiled": 150,
                             "model_folder": 30, "serve": 90, "batch": 30})


def reduced_setting(args) -> Setting:
    return Setting(reduced=True, device="cpu", dtype="float32", preset="tiny", size=64, steps=4, iters=3,
                   train_size=64, train_batch=2, train_iters=1, encoder_batch=2, serve_size=64,
                   serve_steps=args.serve_steps or 2, serve_requests=4, serve_threads=1, batch_pairs=8,
                   compile_backend=args.compile_backend or "eager", switch_steps=1, switch_iters=1, budget=args.budget or 150,
                   limits={"colorize": 60, "train": 40, "encoder": 40, "colorize_compiled": 60,
                           "model_folder": 30, "serve": 90, "batch": 60},
                   minimums={"colorize": 10, "train": 10, "encoder": 10, "colorize_compiled": 15,
                             "model_folder": 5, "serve": 30, "batch": 10})


# ------------------------------------------------------------------------------ running one part
@dataclasses.dataclass
class Outcome:
    part: str
    status: str  # ok | error | timeout | skipped | missing
    seconds: float = 0.0
    limit_s: float | None = None
    records: list[dict] = dataclasses.field(default_factory=list)
    error: str | None = None


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of ``proc``'s group still runs (zombies, which hold no resources, do not count)."""
    proc.poll()  # reap the leader once it has ended
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == proc.pid:
            return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for one part (the part's Ray or server children too):
    SIGTERM, and SIGKILL for what is still there after a few seconds."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE - 1), (signal.SIGKILL, 1.0)):
        if not _group_alive(proc):
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.1)


def run_command(part: str, argv: list[str], limit: float, verbose: bool = False) -> Outcome:
    """Run ``argv`` (from the project root) for at most ``limit`` seconds in a process group of its own;
    its JSON lines are the records, the last other lines explain a failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True, env=env)
    except OSError as error:
        return Outcome(part, "error", 0.0, limit, error=f"{type(error).__name__}: {error}")
    records: list[dict] = []
    tail: collections.deque[str] = collections.deque(maxlen=25)

    def read() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if verbose:
                print(f"[{part}] {line}", file=sys.stderr, flush=True)
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                    continue
            if line.strip():
                tail.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc)  # on a timeout the part; after an exit, whatever it left behind in its group
    code = proc.wait()
    reader.join(5)
    seconds = round(time.monotonic() - started, 1)
    errors = [r["error"] for r in records if isinstance(r.get("error"), str)]
    if timed_out:
        return Outcome(part, "timeout", seconds, limit, records, f"no result within its limit of {limit:.0f} s")
    if code != 0:
        detail = errors[-1] if errors else " | ".join(list(tail)[-6:]) or "no output"
        return Outcome(part, "error", seconds, limit, records, f"exit status {code}: {detail}"[:1500])
    return Outcome(part, "ok", seconds, limit, records, errors[-1] if errors else None)


# ------------------------------------------------------------------------------------ the parts
def part_commands(setting: Setting, args, target: Path,
                  made: Callable[[], bool]) -> dict[str, Callable[[], list[str] | Outcome]]:
    """Each part's command, made when the part is about to start. ``model_folder`` writes ``target``; once
    it has (``made()``) serve and batch use that folder, else serve makes its own and batch runs on its
    defaults. ``batch`` looks for its bench only then."""

    def folder() -> Path | None:
        return target if made() else None

    s = setting
    me = str(Path(__file__).resolve())
    colorize = [sys.executable, me, "--worker", "colorize", "--preset", s.preset, "--device", s.device, "--dtype", s.dtype,
                "--size", str(s.size), "--steps", str(s.steps), "--iters", str(s.iters),
                "--reference-guidance", str(args.reference_guidance), "--sketch-guidance", str(args.sketch_guidance)]

    def serve() -> list[str]:
        argv = [sys.executable, "bench/serve.py", "--modes", "library", "serve", "--concurrency", "1", "8",
                "--requests", str(s.serve_requests), "--steps", str(s.serve_steps),
                "--size", f"{s.serve_size}x{s.serve_size}", "--device", s.device, "--dtype", s.dtype,
                "--threads", str(s.serve_threads), "--reference-guidance", str(args.reference_guidance),
                "--sketch-guidance", str(args.sketch_guidance)]
        return argv + (["--model", str(folder())] if folder() else ["--preset", s.preset])

    return {
        "colorize": lambda: colorize + ["--switch-steps", str(s.switch_steps), "--switch-iters", str(s.switch_iters)],
        "colorize_compiled": lambda: colorize + ["--compile", "--compile-scope", args.compile_scope,
                                                 "--compile-backend", s.compile_backend]
                                              + (["--compile-mode", args.compile_mode] if args.compile_mode else []),
        "train": lambda: [sys.executable, "bench/train.py", "--preset", s.preset, "--device", s.device,
                          "--size", str(s.train_size), "--batch", str(s.train_batch), "--gradient-checkpointing",
                          "--warmup", "0" if s.reduced else "1", "--iters", str(s.train_iters)],
        "encoder": lambda: [sys.executable, "bench/preprocess.py", "--encoders-only", "--preset", s.preset,
                            "--encoder-preset", s.preset, "--device", s.device, "--batch", str(s.encoder_batch),
                            "--repeats", str(s.train_iters), "--images", "1"],
        "model_folder": lambda: [sys.executable, me, "--worker", "model-folder", "--preset", s.preset,
                                 "--device", s.device, "--dtype", s.dtype, "--out", str(target)],
        "serve": serve,
        "batch": lambda: batch_command(setting, args, folder(), workdir=target.parent / "batch"),
    }


def batch_command(setting: Setting, args, folder: Path | None, script: Path | None = None,
                  workdir: Path | None = None) -> list[str] | Outcome:
    """``bench/colorize_batch.py`` with those of our options that its ``--help`` lists (the serve part's
    size and steps), or why it cannot run."""
    script = script or ROOT / "bench" / "colorize_batch.py"
    if not script.is_file():
        return Outcome("batch", "missing", error=f"{script} does not exist in this checkout")
    try:
        shown = subprocess.run([sys.executable, str(script), "--help"], check=False, cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return Outcome("batch", "error", error="--help did not answer within 60 s")
    if shown.returncode != 0:
        last = (shown.stderr or shown.stdout).strip().splitlines()[-1:] or ["no output"]
        return Outcome("batch", "error", error=f"--help failed (exit status {shown.returncode}): {last[0]}"[:500])
    listed = shown.stdout
    argv = [sys.executable, str(script)]
    wanted = {"--model": [str(folder)] if folder else None, "--device": [setting.device], "--dtype": [setting.dtype],
              "--preset": None if folder else [setting.preset], "--size": [str(setting.serve_size)],
              "--steps": [str(setting.serve_steps)], "--pairs": [str(setting.batch_pairs)],
              "--workdir": [str(workdir)] if workdir else None,
              # reduced: its loop and the job's stages in one process; the Ray stream has its own tests
              "--modes": ["loop", "in_process"] if setting.reduced else None}
    for flag, values in wanted.items():
        if values and re.search(rf"(?<![\w-]){flag}(?![\w-])", listed) and flag not in args.batch_args:
            argv += [flag, *values]
    return argv + shlex.split(args.batch_args)


# ------------------------------------------------------------------------------------ the table
@dataclasses.dataclass
class Row:
    figure: str
    measured: str
    anchor: str = "—"
    goal: str = "—"
    verdict: str = "—"


def _judge(value, ok: Callable[[float], bool] | None, reduced: bool, any_machine: bool = False) -> str:
    if ok is None or value is None:
        return "—"
    if reduced and not any_machine:
        return "n/a (reduced)"
    return "met" if ok(value) else "not met"


def _find(records: list[dict], **match) -> dict | None:
    found = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def _num(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def rows_for(outcome: Outcome, setting: Setting) -> list[Row]:
    """The headline rows of one part (a part that did not finish keeps the rows its records allow, and
    says why the rest is missing); output it cannot read becomes a row that says so."""
    try:
        rows = _rows(outcome, setting)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        rows = [Row(f"`{outcome.part}` part", f"its output could not be read: {type(error).__name__}: {error}"[:300])]
    if outcome.status != "ok" or (not rows and outcome.part != "model_folder"):
        why = {"timeout": "timed out", "error": "failed", "skipped": "not run", "missing": "missing",
               "ok": "no headline figure in its output"}[outcome.status]
        detail = f"{why}: {outcome.error}" if outcome.error else why
        rows.append(Row(f"`{outcome.part}` part", detail.replace("|", "/").replace("\n", " ")[:300]))
    return rows


def _rows(outcome: Outcome, setting: Setting) -> list[Row]:
    s, r, red = setting, outcome.records, setting.reduced
    rows: list[Row] = []
    if outcome.part in ("colorize", "colorize_compiled"):
        compiled = outcome.part == "colorize_compiled"
        label = (f"colorize {s.size}², {s.steps} steps, dual guidance, "
                 + ("`torch.compile`d" if compiled else "eager"))
        line = _find(r, variant="compiled" if compiled else "eager")
        if line and "seconds" in line:
            measured = f"{line['seconds']:.3g} s ({line['seconds_per_step']:.3g} s/step)"
            if compiled:
                measured += f"; compiling {line['compile_s']:.0f} s ({line['scope']}, {line['backend']})"
            anchor = ("U-Net alone: 0.0338 s/step at batch 2, 0.68 s per 20 steps, after 115 s compiling"
                      if compiled else "U-Net alone: 0.120 s/step eager at batch 2 (0.0775 s with channels_last)")
            rows.append(Row(label, measured, anchor, "whole colorize ≤ 0.75 s",
                            _judge(line["seconds"], lambda v: v <= 0.75, red)))
        for switch in (x for x in r if x.get("bench") == "gpu_check_switch" and x["switch"] != "plain"):
            figure = f"colorize {s.size}², {switch['steps']} steps, switch `{switch['switch']}`"
            if "error" in switch:
                rows.append(Row(figure, f"not run: {switch['error']}".replace("|", "/")[:200]))
            elif switch.get("ratio_vs_plain") is not None:
                rows.append(Row(figure, f"{switch['seconds']:.3g} s, {switch['ratio_vs_plain']:.2f}× the plain model's time",
                                "channels_last: U-Net step 0.65× on an H100" if "unet" in switch["switch"] else "—",
                                "below 1×", _judge(switch["ratio_vs_plain"], lambda v: v < 1.0, red)))
    elif outcome.part == "train":
        plain, fused = _find(r, variant="plain"), _find(r, variant="fused")
        naive = _find(r, variant="naive")
        if plain:
            rows.append(Row(f"training step, {s.preset} {s.train_size}², batch {s.train_batch}, checkpointing, "
                            "Gram off", f"{plain['samples_per_s']:.3g} samples/s, {_num(plain['peak_gib'], ' GiB')} peak",
                            "11.1 samples/s, 15.2 GiB (U-Net fwd+bwd, no optimizer)"))
        if fused:
            rows.append(Row("… Gram on (ours, fused)", f"{fused['samples_per_s']:.3g} samples/s, "
                            f"{_num(fused['peak_gib'], ' GiB')} peak", "—", "≥ 10 samples/s per H100",
                            _judge(fused["samples_per_s"], lambda v: v >= 10, red)))
            rows.append(Row("… Gram on/off time ratio", f"{fused['time_vs_plain']:.3g}×", "+94% (batch 4)",
                            "≤ 1.20×", _judge(fused["time_vs_plain"], lambda v: v <= 1.2, red)))
            memory = fused.get("memory_vs_plain")
            rows.append(Row("… Gram on/off peak memory ratio", _num(memory, "×") if memory else "— (CPU: not measured)",
                            "+40% (batch 4)", "≤ 1.10×", _judge(memory, lambda v: v <= 1.1, red)))
        if naive:
            rows.append(Row("… naive second forward, time / memory ratio",
                            f"{naive['time_vs_plain']:.3g}× / {_num(naive.get('memory_vs_plain'), '×')}",
                            "+124% / +45% (batch 4)"))
    elif outcome.part == "encoder":
        anchors = {"tagger": "440 images/s", "clip": "520 images/s", "vae_encode": "34 images/s"}
        for name in ("all_three", "tagger", "clip", "vae_encode"):
            line = _find(r, bench="encoder_stage", part=name)
            if not line:
                continue
            size = "×".join(str(v) for v in line["size"])
            if name == "all_three":
                rows.append(Row(f"encoder stage (WD + CLIP + VAE), {size}, batch {line['batch']}",
                                f"{line['images_per_s']:.4g} images/s", "—", "≥ 300 images/s",
                                _judge(line["images_per_s"], lambda v: v >= 300, red)))
            else:
                rows.append(Row(f"… {name}", f"{line['images_per_s']:.4g} images/s", anchors[name],
                                "≥ 2× eager (cache latents once)" if name == "vae_encode" else "—"))
    elif outcome.part == "serve":
        where = next((x["setting"] for x in r if isinstance(x.get("setting"), dict)), {})
        shape = f"{'×'.join(map(str, where.get('size', [])))}, {where.get('steps', '?')} steps" if where else ""
        for mode in ("library", "serve"):
            for concurrency in (1, 8):
                line = next((x for x in r if x.get("bench") == "serve" and x.get("mode") == mode
                             and x.get("concurrency") == concurrency and not x.get("raw")), None)
                if not line:
                    continue
                if mode == "library":
                    what = (f"{line['p50_s']:.3g} s p50, {line['p99_s']:.3g} s p99" if concurrency == 1
                            else f"`colorize_batch` of 8: {line['batched_rps']:.3g} pairs/s")
                    rows.append(Row(f"library at concurrency {concurrency} ({shape})", what))
                else:
                    rows.append(Row(f"Ray Serve at concurrency {concurrency} ({shape})",
                                    f"{line['p50_s']:.3g} s p50, {line['p99_s']:.3g} s p99, "
                                    f"{line['throughput_rps']:.3g} requests/s"))
        summary = _find(r, bench="serve", summary=True)
        if summary:
            added = summary.get("serve_added_latency_ms_at_1")
            ratio = summary.get("serve_throughput_ratio_at_8")
            rows.append(Row("Ray Serve: latency added at concurrency 1", _num(added, " ms"), "+0.2 s (CPU, tiny)",
                            "≤ 30 ms", _judge(added, lambda v: v <= 30, red, any_machine=True)))
            rows.append(Row("Ray Serve: throughput at 8 / library `colorize_batch`", _num(ratio, "×"),
                            "0.39× (CPU, tiny)", "≥ 0.9×", _judge(ratio, lambda v: v >= 0.9, red, any_machine=True)))
    elif outcome.part == "batch":
        for line in r:
            figures = {k: v for k, v in line.items() if "pairs_per_s" in k or "ratio" in k or "speedup" in k}
            if not figures:
                continue
            named = ", ".join(f"{k}={v}" for k, v in line.items()
                              if k in ("variant", "mode", "pairs", "size", "steps", "batch_size") and v is not None)
            rows.append(Row(f"batch colorization{f' ({named})' if named else ''}",
                            ", ".join(f"{k} {_num(v)}" for k, v in figures.items()), "—",
                            "above the plain `colorize_batch` loop (issue 16)" if "ratio_vs_loop" in line else "—"))
    return rows


def markdown(rows: list[Row], setting: Setting, outcomes: list[Outcome], total: float) -> str:
    mode = ("reduced: CPU, `tiny` preset, tiny sizes; figures are a sign of life, only ratio goals judged"
            if setting.reduced else f"{setting.device}, {setting.dtype}, `{setting.preset}` preset")
    lines = [f"GPU check ({mode}; weights: {WEIGHTS}). Anchors: {ANCHORS}. Total {total:.0f} s of a "
             f"{setting.budget:.0f} s budget; parts: "
             + ", ".join(f"{o.part} {o.status} {o.seconds:.0f} s" for o in outcomes) + ".",
             "", "| figure | measured | anchor | goal | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.figure} | {r.measured} | {r.anchor} | {r.goal} | {r.verdict} |" for r in rows]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- run
def _environment(setting: Setting) -> dict:
    found = {name: importlib.util.find_spec(name) is not None for name in MODULES}
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 check=False, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (subprocess.TimeoutExpired, OSError):
            gpu = None
    return {"gpu": gpu, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "missing_modules": [name for name, ok in found.items() if not ok]}


def run_check(setting: Setting, args, parts: list[str]) -> tuple[list[Outcome], list[Row]]:
    started = time.monotonic()
    deadline = started + setting.budget
    workdir = tempfile.TemporaryDirectory(prefix="gpu-check-")
    outcomes: list[Outcome] = []
    try:
        commands = part_commands(setting, args, Path(workdir.name) / "model",
                                 lambda: any(o.part == "model_folder" and o.status == "ok" for o in outcomes))
        for part in parts:
            left = deadline - time.monotonic()
            limit = min(setting.limits[part], left - KILL_GRACE)
            if limit < min(setting.minimums[part], setting.limits[part]):
                outcome = Outcome(part, "skipped", error=f"{max(0.0, left):.0f} s of the {setting.budget:.0f} s budget "
                                                         f"left, this part needs {setting.minimums[part]:.0f} s")
            else:
                command = commands[part]()
                outcome = command if isinstance(command, Outcome) else run_command(part, command, limit, args.verbose)
            outcomes.append(outcome)
            rows = rows_for(outcome, setting)
            emit({"bench": "gpu_check", "part": outcome.part, "status": outcome.status, "seconds": outcome.seconds,
                  "limit_s": None if outcome.limit_s is None else round(outcome.limit_s), "error": outcome.error,
                  "headline": [dataclasses.asdict(row) for row in rows], "records": outcome.records})
    finally:
        workdir.cleanup()
    rows = [row for outcome in outcomes for row in rows_for(outcome, setting)]
    return outcomes, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="CPU, tiny preset, tiny sizes (default without CUDA)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="run only these (in the fixed order)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="leave these out")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 440; reduced 150)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="one part's time limit (repeatable)")
    parser.add_argument("--reference-guidance", type=float, default=4.5)
    parser.add_argument("--sketch-guidance", type=float, default=2.0, help="above 1: dual guidance")
    parser.add_argument("--compile-scope", choices=("unet", "blocks"), default="unet",
                        help="compile the whole denoiser, or each transformer and ResNet block (regional)")
    parser.add_argument("--compile-backend", help="default inductor; reduced: eager (dynamo tracing only)")
    parser.add_argument("--compile-mode", help="torch.compile mode (inductor), e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--serve-steps", type=int, help="sampling steps of the serve part (default 4; reduced 2)")
    parser.add_argument("--batch-args", default="", help="extra arguments of bench/colorize_batch.py")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--verbose", action="store_true", help="echo every part's output to stderr")
    parser.add_argument("--worker", choices=("colorize", "model-folder"), help=argparse.SUPPRESS)
    for name, kind, default in (("preset", str, "tiny"), ("device", str, "cpu"), ("dtype", str, "float32"),
                                ("size", int, 64), ("steps", int, 4), ("iters", int, 1), ("out", Path, None)):
        parser.add_argument(f"--{name}", type=kind, default=default, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--switch-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--switch-iters", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "colorize":
        return worker_colorize(args)
    if args.worker == "model-folder":
        return worker_model_folder(args)

    import torch

    reduced = args.reduced or not torch.cuda.is_available()
    setting = reduced_setting(args) if reduced else gpu_setting(args)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            parser.error(f"--limit takes PART=SECONDS with PART one of {PARTS}, got {item!r}")
        setting.limits[name] = float(seconds)
    # Reduced, serve and batch make their own tiny folders in-process: one Python start-up less.
    default = [p for p in PARTS if not (setting.reduced and p == "model_folder")]
    parts = [p for p in PARTS if p in (args.parts or default) and p not in args.skip]
    emit({"bench": "gpu_check", "setting": {**dataclasses.asdict(setting), "parts": parts, "weights": WEIGHTS,
                                             "anchors": ANCHORS, **_environment(setting)}})
    started = time.monotonic()
    outcomes, rows = run_check(setting, args, parts)
    total = time.monotonic() - started
    emit({"bench": "gpu_check", "summary": True, "reduced": setting.reduced, "seconds": round(total, 1),
          "statuses": {o.part: o.status for o in outcomes}, "rows": [dataclasses.asdict(row) for row in rows]})
    table = markdown(rows, setting, outcomes, total)
    print()
    print(table, end="", flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 1 if any(o.status in ("error", "timeout") for o in outcomes) else 0


# ---------------------------------------------------------------------------------------- workers
def _build(args):
    """A random-init model of ``args.preset`` built on the device directly at the run dtype."""
    import torch

    from bench.sdxl_cpu_step import default_dtype
    from model.colorizer import Colorizer
    from model.config import get_preset

    torch.manual_seed(0)
    with torch.device(args.device), default_dtype(getattr(torch, args.dtype)):
        return Colorizer.from_config(get_preset(args.preset)).eval()


def worker_colorize(args) -> int:
    import numpy as np
    import torch

    from bench.model import emit as bench_emit
    from bench.model import median_seconds, peak_gib, reset_peak, synchronize
    from model.options import ColorizeOptions

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    model = _build(args)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    sketch = rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
    reference = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    options = ColorizeOptions(size=(args.size, args.size), steps=args.steps,
                              reference_guidance=args.reference_guidance, sketch_guidance=args.sketch_guidance)
    run = lambda: model.colorize(sketch, reference, options, seed=0)
    record = {"bench": "gpu_check_colorize", "variant": "compiled" if args.compile else "eager",
              "preset": args.preset, "device": device.type, "dtype": args.dtype, "size": args.size,
              "steps": args.steps, "reference_guidance": args.reference_guidance,
              "sketch_guidance": args.sketch_guidance, "weights": WEIGHTS, "build_s": round(build_s, 1)}
    warmups = []
    try:
        if args.compile:
            record.update(scope=args.compile_scope, backend=args.compile_backend, mode=args.compile_mode)
            from model.acceleration import Acceleration

            compiled = model.accelerate(Acceleration(compile=args.compile_scope, compile_backend=args.compile_backend,
                                                     compile_mode=args.compile_mode))
            record["compiled_modules"] = compiled["compiled_modules"]
        reset_peak(device)
        for _ in range(2 if args.compile else 1):  # a recompile on the second call belongs to compiling too
            start = time.perf_counter()
            run()
            synchronize(device)
            warmups.append(time.perf_counter() - start)
        seconds = median_seconds(run, device, 0, args.iters)
    except Exception as error:  # noqa: BLE001 - a failing compile is a result: report it and let the rest go on
        bench_emit({**record, "warmup_s": [round(w, 2) for w in warmups],
                    "error": f"{type(error).__name__}: {error}"[:1000]})
        return 1
    record.update(seconds=round(seconds, 4), seconds_per_step=round(seconds / args.steps, 4),
                  first_call_s=round(warmups[0], 2), peak_gib=peak_gib(device))
    if args.compile:
        record["compile_s"] = round(sum(warmups) - len(warmups) * seconds, 1)
    bench_emit(record)
    if not args.compile and args.switch_steps > 0:
        time_switches(model, sketch, reference, options, args, device)
    return 0


SWITCHES = (  # (name, Acceleration fields or a dtype) timed against the plain model in the same process
    ("plain", {}), ("channels_last=unet", {"channels_last": ("unet",)}),
    ("channels_last=unet,vae_decoder", {"channels_last": ("unet", "vae_decoder")}),
    ("attention=flash", {"attention": "flash"}), ("attention=efficient", {"attention": "efficient"}),
    ("attention=cudnn", {"attention": "cudnn"}), ("attention=math", {"attention": "math"}),
    ("dtype=float32", "float32"), ("dtype=bfloat16", "bfloat16"),
)


def time_switches(model, sketch, reference, options, args, device) -> None:
    """Each switch of model/acceleration.py (and the dtype) alone, at ``--switch-steps`` steps, against the
    plain model: one ``gpu_check_switch`` line each, with its ratio. A kernel the device lacks is reported
    as the error it raised."""
    import dataclasses as dc

    import torch

    from bench.model import emit as bench_emit
    from bench.model import median_seconds, peak_gib, reset_peak
    from model.acceleration import Acceleration

    short = dc.replace(options, steps=args.switch_steps)
    run = lambda: model.colorize(sketch, reference, short, seed=0)
    base_dtype = model.dtype
    plain_s = None
    for name, switch in SWITCHES:
        record = {"bench": "gpu_check_switch", "switch": name, "steps": args.switch_steps, "size": args.size,
                  "device": device.type}
        try:
            if isinstance(switch, str):
                model.accelerate(Acceleration())
                model.to(getattr(torch, switch))
            else:
                model.to(base_dtype)
                model.accelerate(Acceleration(**switch))
            reset_peak(device)
            seconds = median_seconds(run, device, 1, args.switch_iters)
        except Exception as error:  # noqa: BLE001 - a kernel this device lacks is a result
            bench_emit({**record, "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        if name == "plain":
            plain_s = seconds
        record.update(seconds=round(seconds, 4), peak_gib=peak_gib(device),
                      ratio_vs_plain=None if not plain_s else round(seconds / plain_s, 3))
        bench_emit(record)
    model.to(base_dtype)
    model.accelerate(Acceleration())


def worker_model_folder(args) -> int:
    from bench.model import emit as bench_emit

    started = time.perf_counter()
    model = _build(args)
    model.to("cpu").save_pretrained(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    bench_emit({"bench": "gpu_check_model_folder", "preset": args.preset, "dtype": args.dtype, "weights": WEIGHTS,
                "seconds": round(time.perf_counter() - started, 1), "gib": round(size / 2**30, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
