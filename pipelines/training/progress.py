"""Progress lines for long loops, in the shape people who train models read: ``step i/N``, the loss, the
throughput and an ETA, printed at a steady cadence (every ``every`` steps and at the last one).

Plain lines (flushed) rather than a progress bar: Ray Train forwards worker stdout line by line to the
driver and to ``ray job logs``, where a redrawn bar would arrive as hundreds of fragments. The lines are
written to ``sys.stdout`` directly: Ray Train 2.x patches ``print`` in its workers to tee into its own
logger as well, so a plain ``print`` reaches the driver twice.
"""

from __future__ import annotations

import sys
import time


def write_line(text: str, flush: bool = True) -> None:
    """One line to stdout, bypassing a patched ``print``."""
    sys.stdout.write(text + "\n")
    if flush:
        sys.stdout.flush()


def format_seconds(seconds: float) -> str:
    """``75`` → ``1m15s``; ``3725`` → ``1h02m``; under a minute as ``42s``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Prints ``[name] step i/N (p%) | loss ... | samples/s ... | ETA ...`` from rank 0.

    The ETA extrapolates the mean time per step since this process started (after a resume, from the
    first step it ran), so it is honest after restarts and settles as the run goes on."""

    def __init__(self, name: str, total: int, *, every: int = 10, first_step: int = 0, active: bool = True,
                 clock=time.perf_counter, out=write_line):
        if every < 1:
            raise ValueError(f"every must be positive, got {every}")
        self.name, self.total, self.every, self.active = name, total, every, active
        self.first_step, self.clock, self.out = first_step, clock, out
        self.started = clock()

    def line(self, step: int, **values: float) -> str:
        elapsed = self.clock() - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"[{self.name}] step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        parts += [f"{key.replace('_per_s', '/s').replace('_', ' ')} {value:.4g}" for key, value in values.items()]
        parts.append(f"elapsed {format_seconds(elapsed)}")
        parts.append("ETA " + (format_seconds(eta) if eta == eta else "?"))
        return " | ".join(parts)

    def update(self, step: int, **values: float) -> str | None:
        """Print (and return) the line when ``step`` is on the cadence or the last one; else None."""
        if not self.active or (step % self.every and step != self.total):
            return None
        text = self.line(step, **values)
        self.out(text, flush=True)
        return text
