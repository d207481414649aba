"""Trial progress a person can follow during a sweep.

Each trial's control loop writes `<run_dir>/progress.json` (step, total, last eval accuracy,
steps/s) at most once a second; the sweep's Tune callback (orchestrator/scheduler.py), on the driver,
reads them from the shared run folders and prints one line per running trial: redrawn in place on
a terminal, or as plain lines (at most every 30 s per trial, and at each eval) when the output is
not a terminal (`ray job logs`, CI)."""

from __future__ import annotations

import json
import os
import sys
import time
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
    """Printed by the scheduler on stderr."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.drawn = 0
        self.last: dict[str, tuple[float, str, float | None]] = {}

    def show(self, trials: dict[str, Path]) -> None:
        lines = [line(name, read(run_dir)) for name, run_dir in trials.items()]
        if self.tty:
            self.stream.write("\x1b[F\x1b[2K" * self.drawn + "".join(f"{ln}\n" for ln in lines))
            self.drawn = len(lines)
        else:
            now = time.time()
            for name, ln in zip(trials, lines):
                p = read(trials[name]) or {}
                t, prev, acc = self.last.get(name, (0.0, "", None))
                if ln != prev and (now - t >= 30 or p.get("eval_accuracy") != acc):
                    self.stream.write(ln + "\n")
                    self.last[name] = (now, ln, p.get("eval_accuracy"))
        self.stream.flush()

    def message(self, text: str, stream=None) -> None:
        """A line above the board (on `stream`, default the board's own: results go to stdout)."""
        if self.tty and self.drawn:
            self.stream.write("\x1b[F\x1b[2K" * self.drawn)
            self.stream.flush()
            self.drawn = 0
        out = stream or self.stream
        out.write(text + "\n")
        out.flush()
