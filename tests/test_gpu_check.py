"""bench/gpu_check.py: the one-call GPU check, in its reduced CPU mode (so that it cannot rot), and its
runner: a part that fails or outlives its limit is reported and the rest still run, within the budget."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_reduced_run_measures_colorize_and_encoders_and_reports_a_part_past_its_limit(tmp_path):
    """Real colorize and encoder parts on the tiny preset; the training part gets a 1 s limit, which no
    Python start-up meets: it is reported and the part after it runs."""
    table_file = tmp_path / "table.md"
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--reduced",
                          "--parts", "colorize", "train", "encoder",
                          "--limit", "train=1", "--budget", "100", "--markdown", str(table_file)],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=150,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr  # a part timed out
    lines = _lines(run.stdout)
    setting = lines[0]["setting"]
    assert setting["reduced"] and setting["preset"] == "tiny" and setting["device"] == "cpu"
    assert "random init" in setting["weights"]
    parts = {line["part"]: line for line in lines if "part" in line and line.get("bench") == "gpu_check"}
    assert list(parts) == ["colorize", "train", "encoder"]  # the fixed order

    eager = next(r for r in parts["colorize"]["records"] if r.get("variant") == "eager")
    assert parts["colorize"]["status"] == "ok" and eager["seconds"] > 0 and eager["steps"] == 4
    assert eager["sketch_guidance"] > 1 and eager["reference_guidance"] == 4.5  # dual guidance
    switches = {r["switch"]: r for r in parts["colorize"]["records"] if r.get("bench") == "gpu_check_switch"}
    assert {"plain", "channels_last=unet", "attention=math", "dtype=bfloat16"} <= set(switches)
    assert switches["plain"]["ratio_vs_plain"] == 1.0 and switches["channels_last=unet"]["seconds"] > 0
    assert "error" in switches["attention=efficient"]  # no memory-efficient kernel on a CPU: said, not hidden
    assert parts["train"]["status"] == "timeout" and parts["train"]["seconds"] < 15
    assert "limit of 1 s" in parts["train"]["error"]
    encoders = {r["part"]: r for r in parts["encoder"]["records"] if r.get("bench") == "encoder_stage"}
    assert parts["encoder"]["status"] == "ok" and set(encoders) == {"tagger", "clip", "vae_encode", "all_three"}
    assert all(r["images_per_s"] > 0 for r in encoders.values())

    summary = next(line for line in lines if line.get("summary"))
    assert summary["reduced"] and summary["statuses"]["train"] == "timeout"
    table = run.stdout[run.stdout.index("GPU check ("):]
    assert table == table_file.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| figure | measured | anchor | goal | verdict |"
    assert all(row.count(" | ") == 4 for row in rows)
    colorize_row = next(row for row in rows if row.startswith("| colorize 64², 4 steps, dual guidance, eager"))
    assert "whole colorize ≤ 0.75 s" in colorize_row and "n/a (reduced)" in colorize_row
    assert any(row.startswith("| encoder stage (WD + CLIP + VAE)") and "≥ 300 images/s" in row for row in rows)
    assert any(row.startswith("| `train` part | timed out") for row in rows)
    assert any(row.startswith("| colorize 64², 1 steps, switch `attention=efficient` | not run: ") for row in rows)
    assert elapsed < 100 + 20  # the budget holds (plus start-up and the table)


def test_a_failing_part_is_reported_with_its_error(tmp_path):
    code = "import json; print(json.dumps({'error': 'compile failed: boom'})); print('noise'); raise SystemExit(3)"
    outcome = gpu_check.run_command("colorize_compiled", [sys.executable, "-c", code], limit=30)
    assert outcome.status == "error" and "exit status 3" in outcome.error and "boom" in outcome.error
    assert outcome.records == [{"error": "compile failed: boom"}]
    rows = gpu_check.rows_for(outcome, gpu_check.reduced_setting(_args()))
    assert rows[-1].figure == "`colorize_compiled` part" and rows[-1].measured.startswith("failed: exit status 3")

    silent = gpu_check.run_command("encoder", [sys.executable, "-c", "import sys; sys.exit('no encoders here')"], 30)
    assert silent.status == "error" and "no encoders here" in silent.error


def test_a_hanging_part_is_killed_with_its_children_at_its_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print('{{"bench": "x", "partial": 1}}', flush=True)
        time.sleep(120)
    """)
    started = time.monotonic()
    outcome = gpu_check.run_command("serve", [sys.executable, "-c", code], limit=3)
    assert time.monotonic() - started < 8
    assert outcome.status == "timeout" and outcome.records == [{"bench": "x", "partial": 1}]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_the_budget_skips_what_no_longer_fits(monkeypatch):
    """The first part hangs past the whole budget: it is cut at what was left, the others are skipped."""
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    summary = {"bench": "serve", "summary": True, "serve_added_latency_ms_at_1": 12.0,
               "serve_throughput_ratio_at_8": 0.5}
    quick = [sys.executable, "-c", f"print({json.dumps(summary)!r})"]
    monkeypatch.setattr(gpu_check, "part_commands", lambda *a: {"colorize": lambda: hang, "train": lambda: quick,
                                                                "serve": lambda: quick})
    args = _args()
    setting = gpu_check.reduced_setting(args)
    setting.budget, setting.limits["colorize"] = gpu_check.KILL_GRACE + 3, 2
    started = time.monotonic()
    outcomes, rows = gpu_check.run_check(setting, args, ["colorize", "train"])
    assert time.monotonic() - started < 15
    assert [(o.part, o.status) for o in outcomes] == [("colorize", "timeout"), ("train", "skipped")]
    assert outcomes[0].limit_s == 2 and outcomes[0].seconds < 5 and "budget" in outcomes[1].error
    assert [r.figure for r in rows] == ["`colorize` part", "`train` part"]

    setting.budget = 60  # ratio goals are judged in the reduced mode too: they hold on any machine
    outcomes, rows = gpu_check.run_check(setting, args, ["serve"])
    judged = {r.figure: r.verdict for r in rows}
    assert judged["Ray Serve: latency added at concurrency 1"] == "met"
    assert judged["Ray Serve: throughput at 8 / library `colorize_batch`"] == "not met"


def test_the_batch_bench_is_reported_missing_or_run_with_the_options_it_lists(tmp_path):
    args = _args()
    setting = gpu_check.reduced_setting(args)
    missing = gpu_check.batch_command(setting, args, None, script=tmp_path / "colorize_batch.py")
    assert missing.status == "missing" and "does not exist" in missing.error
    assert gpu_check.rows_for(missing, setting)[-1].measured.startswith("missing")

    script = tmp_path / "colorize_batch.py"
    script.write_text(textwrap.dedent("""
        import argparse, json
        parser = argparse.ArgumentParser()
        parser.add_argument("--model")
        parser.add_argument("--device")
        args = parser.parse_args()
        print(json.dumps({"bench": "colorize_batch", "mode": "ray", "model": args.model, "device": args.device,
                          "pairs_per_s": 3.5, "ratio_vs_loop": 1.4}))
    """))
    argv = gpu_check.batch_command(setting, args, tmp_path / "model", script=script)
    assert argv[2:] == ["--model", str(tmp_path / "model"), "--device", "cpu"]  # no --dtype: not listed
    outcome = gpu_check.run_command("batch", argv, 30)
    assert outcome.status == "ok"
    (row,) = gpu_check.rows_for(outcome, setting)
    assert row.figure == "batch colorization (mode=ray)" and "pairs_per_s 3.5, ratio_vs_loop 1.4" in row.measured


def test_unreadable_output_becomes_a_row_not_a_crash():
    outcome = gpu_check.Outcome("train", "ok", 1.0, 10, records=[{"variant": "plain", "samples_per_s": "fast"}])
    (row,) = gpu_check.rows_for(outcome, gpu_check.reduced_setting(_args()))
    assert row.figure == "`train` part" and "could not be read" in row.measured


def _args():
    return argparse.Namespace(
        serve_steps=None, compile_backend=None, budget=None, reference_guidance=4.5, sketch_guidance=2.0,
        compile_scope="unet", compile_mode=None, batch_args="", verbose=False)
