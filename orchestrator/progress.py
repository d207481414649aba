"""Trial progress a person can follow during a sweep.

Each trial's control loop writes `<run_dir>/progress.json` (step, total, last eval accuracy,
steps/s) at most once a second; the sweep's Tune callback (orchestrator/scheduler.py), on the driver,
reads them from the shared run folders and prints a line per running trial at each evaluation and
at least every 30 s (plain lines: the same on a terminal, in `ray job logs` and in CI)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ProgressFile:
    """Written by the trainer."""

    def __init__(self, run_dir: Path, total: int) -> None:
        self.path, self.total = run_dir / "progress.json", total
        self.t0, self.last_write, self.first_step, self.acc = time.time(), 0.0, None, None

    def update(self, step: int, eval_accuracy: float | None = None) -> None:
        if eval_accuracy is not None:
            self.acc = eval_accuracy
        if self.first_step is None:
            self.first_step, self.t0 = step, time.time()
        now = time.time()
        if now - self.last_write < 1.0 and step < self.total and eval_accuracy is None:
            return
        rate = (step - self.first_step) / (now - self.t0) if now > self.t0 and step > self.first_step else None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "total": self.total, "eval_accuracy": self.acc, "steps_per_s": rate}))
        os.replace(tmp, self.path)
        self.last_write = now


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def line(name: str, p: dict | None) -> str:
    if not p:
        return f"  {name}: starting"
    acc = f"  eval acc {p['eval_accuracy']:.3f}" if p.get("eval_accuracy") is not None else ""
    eta = ""
    if p.get("steps_per_s"):
        left = (p["total"] - p["step"]) / p["steps_per_s"]
        eta = f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
    return f"  {name}: step {p['step']}/{p['total']} ({100 * p['step'] // max(p['total'], 1)}%){acc}{eta}"


class ProgressBoard:
    """Printed by the sweep's Tune callback on stderr: plain lines, so they interleave cleanly with
    Tune's trial table (a line per trial at each evaluation and at least every 30 s)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.last: dict[str, tuple[float, str, float | None]] = {}

    def show(self, trials: dict[str, Path]) -> None:
        now = time.time()
        for name, run_dir in trials.items():
            p = read(run_dir) or {}
            ln = line(name, p or None)
            t, prev, acc = self.last.get(name, (0.0, "", None))
            if ln != prev and (now - t >= 30 or p.get("eval_accuracy") != acc):
                self.stream.write(ln + "\n")
                self.last[name] = (now, ln, p.get("eval_accuracy"))
        self.stream.flush()

    def message(self, text: str, stream=None) -> None:
        """A status line (on `stream`, default the board's own: results go to stdout)."""
        out = stream or self.stream
        out.write(text + "\n")
        out.flush()


class Timer:
    """`with timer("rollout"): ...` records the block's wall seconds as `timing/rollout`."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[f"timing/{name}"] = time.perf_counter() - t0


def progress_bar(start: int, total: int, enabled: bool):
    """The run's step bar on stderr (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="opd", unit="step", disable=not enabled, dynamic_ncols=True)
