"""The full-size ``sdxl`` preset runs, not only builds on the meta device: random weights in bf16 on the
CPU, one colorization step at 256×256 pixels, in a child process so its peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdxl_preset_colorizes_one_step_in_bf16_on_cpu(capsys):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sdxl_cpu_step.py"), "--size", "256", "--steps", "1"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    records = {r["phase"]: r for r in map(json.loads, run.stdout.splitlines())}
    build, colorize = records["build"], records["colorize"]
    assert build["parameters"] > 4.5e9  # U-Net 2.6B + CLIP-bigG 1.8B + tagger, encoders, VAE
    assert colorize["shape"] == [1, 3, 256, 256] and colorize["dtype"] == "bfloat16"
    assert colorize["finite"] and colorize["std"] > 0
    with capsys.disabled():
        print(f"\nsdxl preset, bf16 CPU: build {build['seconds']} s, one 256² step {colorize['seconds']} s, "
              f"peak RSS {colorize['peak_rss_gib']} GiB")
