"""Fit the cost model's throughput constants to a run that happened.

A run logs, per step, each role's busy seconds (`timing/<role>_busy`: its busiest actor on the
step's batch), the weight sync (`timing/sync`), the step's wall time and critical path, and the
tokens it moved (`train/response_tokens`, `learner/real_tokens`). Each role's modelled time is
t(c) = L + A / c: a latency L (kept at its default) plus work A over one constant c
(`core/cost_model.py`):

    rollout  -> decode_bw          teacher -> prefill_mfu
    learner  -> train_mfu          sync    -> sync_bytes_per_s
    driver   -> latency_step = median(step wall - critical path)

so the fit is exact per role: with t1 = t(c0) and t2 = t(2 c0), A / c0 = 2 (t1 - t2) and
L = 2 t2 - t1, and c = c0 (A / c0) / (measured - L), the measured time being the median over
the steady steps (step 1, evaluation and search steps left out). The run's own workload replaces the
plan's assumptions: fill = response tokens / (sequences x response cap), prompt = (real - response
tokens) / sequences. The fit is kept as `calibration.json` beside the run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from core.cost_model import Throughput

ROLE_CONSTANT = {"rollout": "decode_bw", "teacher": "prefill_mfu", "learner": "train_mfu", "sync": "sync_bytes_per_s"}
BUSY_METRIC = {"rollout": "timing/rollout_busy", "teacher": "timing/teacher_busy", "learner": "timing/learner_busy",
               "sync": "timing/sync"}
FILE = "calibration.json"


@dataclass
class Calibration:
    """Fitted constants, the workload shape they were measured on, and how well they reproduce it."""

    throughput: Throughput
    fill: float
    """Mean response length / the response cap."""
    prompt_len: float
    """Mean prompt tokens per sequence."""
    run: str
    """Where it was measured (run folder or MLflow run id)."""
    device: str = "cpu"
    steps: int = 0
    """Steady steps the medians come from."""
    measured: dict[str, float] = field(default_factory=dict)
    """Median seconds per role (and `step`) on the steady steps."""

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """From a calibration.json, or a run folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE
        data = json.loads(path.read_text())
        data["throughput"] = Throughput(**data["throughput"])
        return cls(**data)


def steady_steps(history: dict[str, dict[int, float]]) -> list[int]:
    """Steps with every busy metric logged, leaving out step 1 (warm-up) and evaluation and search steps."""
    busy = [set(history.get(m, {})) for m in BUSY_METRIC.values()]
    steps = set.intersection(*busy) if busy else set()
    skip = set(history.get("timing/eval", {})) | set(history.get("timing/search", {})) | {1}
    return sorted(steps - skip)


def measured_times(history: dict[str, dict[int, float]], steps: list[int]) -> dict[str, float]:
    """Median seconds per role over `steps`, and the driver's share of a step (wall - critical path)."""
    out = {role: statistics.median(history[m][s] for s in steps) for role, m in BUSY_METRIC.items()}
    out["step"] = statistics.median(history["timing/step"][s] for s in steps)
    out["driver"] = statistics.median(history["timing/step"][s] - history["timing/critical_path"][s] for s in steps)
    return out


def workload_shape(history: dict[str, dict[int, float]], steps: list[int], sequences: int,
                   response_cap: int) -> tuple[float, float]:
    """(fill, prompt tokens per sequence) of the run's batches."""
    response = statistics.median(history["train/response_tokens"][s] for s in steps)
    real = statistics.median(history["learner/real_tokens"][s] for s in steps)
    return response / (sequences * response_cap), (real - response) / sequences


def fit(role_seconds: Callable[[Throughput], dict[str, float]], start: Throughput,
        measured: dict[str, float]) -> tuple[Throughput, list[str]]:
    """Each role's constant such that the model reproduces its measured median (module docstring).
    `role_seconds(thr)`: the model's seconds per role for the measured run's layout and workload.
    Returns the fitted constants and notes (a role whose time is all latency keeps its default)."""
    notes: list[str] = []
    values: dict[str, float] = {}
    for role, name in ROLE_CONSTANT.items():
        c0 = getattr(start, name)
        # the rollout's memory term alone: decoding's compute term must not bind while it is fitted
        base = replace(start, prefill_mfu=1e12) if role == "rollout" else start
        t1 = role_seconds(replace(base, **{name: c0}))[role]
        t2 = role_seconds(replace(base, **{name: 2 * c0}))[role]
        work, latency = 2 * (t1 - t2), 2 * t2 - t1
        if work <= 0 or measured[role] <= latency:
            notes.append(f"{role}: measured {measured[role]:.4g} s is within its latency {latency:.4g} s; "
                         f"{name} kept at {c0:g}")
            continue
        values[name] = c0 * work / (measured[role] - latency)
    values["latency_step"] = max(measured["driver"], 0.0)
    return replace(start, **values), notes
