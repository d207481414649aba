"""Pure numbers behind the dashboard: curves, seed aggregation and steps-to-target. No MLflow,
no matplotlib, so the unit tests run in milliseconds.

Definitions (written under the dashboard's speed-up table too):

- acc0: median step-0 test accuracy of the group's vanilla runs (W_0 is the same for every
  method, so every run starts from it).
- vanilla final: median final test accuracy of the group's vanilla runs.
- target at fraction f: acc0 + f * (vanilla final - acc0), f in {0.5, 0.75, 0.9}.
- steps-to-target of one run: the first evaluated step whose accuracy is >= target (first
  crossing: a noisy curve that later dips below still counts from its first crossing); never
  reached is None. Wall-to-target: the same with the run's wall clock at that evaluation.
- speed-up of a method: vanilla's median steps-to-target / the method's median.
- mean and band across seeds: at each x, the mean and min..max over the seeds that cover that x
  (each seed's curve is linearly interpolated between its own evaluations, never extrapolated).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

FRACTIONS: tuple[float, ...] = (0.5, 0.75, 0.9)
BASELINE = "vanilla"


@dataclass
class Curve:
    """One run's evaluations: x (step or seconds) and test accuracy, sorted by x."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        pairs = sorted(zip(self.x, self.y))
        self.x, self.y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]

    def __len__(self) -> int:
        return len(self.x)


def first_crossing(curve: Curve, target: float) -> float | None:
    """x of the first point with y >= target (1e-12 slack for float noise); None if never."""
    for x, y in zip(curve.x, curve.y):
        if y >= target - 1e-12:
            return x
    return None


def target_accuracy(acc0: float, vanilla_final: float, fraction: float) -> float:
    """acc0 + f * (vanilla final - acc0)."""
    return acc0 + fraction * (vanilla_final - acc0)


@dataclass
class Band:
    """Mean and min..max band across seeds on a common x grid; n = seeds covering each x."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray


def aggregate(curves: list[Curve]) -> Band | None:
    """Mean and min..max band of several seeds' curves on the union of their x values.

    Each curve is interpolated linearly inside its own [first x, last x] and is absent outside
    it, so a seed that stopped early (running, failed) drops out of the mean instead of being
    extended. None when no curve has a point."""
    curves = [c for c in curves if len(c)]
    if not curves:
        return None
    grid = np.array(sorted({x for c in curves for x in c.x}), dtype=float)
    stack = np.full((len(curves), len(grid)), np.nan)
    for i, c in enumerate(curves):
        inside = (grid >= c.x[0]) & (grid <= c.x[-1])
        stack[i, inside] = np.interp(grid[inside], c.x, c.y)
    n = np.sum(~np.isnan(stack), axis=0)
    with np.errstate(invalid="ignore"):
        return Band(grid, np.nanmean(stack, axis=0), np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), n)


@dataclass
class Spread:
    """Median and min..max of one quantity across seeds; `missing` counts seeds that never got there."""

    median: float | None
    low: float | None
    high: float | None
    reached: int
    missing: int

    def __str__(self) -> str:
        if self.median is None:
            return "not reached" if self.missing else "-"
        text = _fmt(self.median)
        if self.reached > 1 and self.low != self.high:
            text += f" [{_fmt(self.low)}-{_fmt(self.high)}]"
        if self.missing:
            text += f" ({self.missing} not reached)"
        return text


def spread(values: list[float | None]) -> Spread:
    """Median and range of the values that exist; None entries (never reached) are counted.

    If fewer than half the seeds reached, the median is None: a median over the lucky seeds
    would flatter the method."""
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    if not got or missing > len(got):
        return Spread(None, None, None, len(got), missing)
    return Spread(statistics.median(got), min(got), max(got), len(got), missing)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


@dataclass
class SpeedupRow:
    """One method in one group: steps and wall seconds to each target, and speed-ups vs vanilla."""

    method: str
    runs: int
    final: Spread
    steps: dict[float, Spread]
    wall: dict[float, Spread]
    step_speedup: dict[float, float | None]
    wall_speedup: dict[float, float | None]


@dataclass
class Targets:
    acc0: float
    vanilla_final: float
    values: dict[float, float]

    @property
    def gain(self) -> float:
        """vanilla final - acc0; with no gain (<= 0) every run 'reaches' every target at step 0,
        so the table shows no steps-to-target at all."""
        return self.vanilla_final - self.acc0


def targets(vanilla_steps: list[Curve], fractions: tuple[float, ...] = FRACTIONS) -> Targets | None:
    """The group's targets from its vanilla runs (acc0 = median first evaluation, vanilla final =
    median last evaluation); None without a vanilla run that has two evaluations."""
    usable = [c for c in vanilla_steps if len(c) >= 2]
    if not usable:
        return None
    acc0 = statistics.median(c.y[0] for c in usable)
    final = statistics.median(c.y[-1] for c in usable)
    return Targets(acc0, final, {f: target_accuracy(acc0, final, f) for f in fractions})


def speedup_rows(by_method: dict[str, list[tuple[Curve, Curve]]], tg: Targets) -> list[SpeedupRow]:
    """Rows of the speed-up table for one group. `by_method[m]` holds (acc vs step, acc vs wall)
    per seed. Speed-up = vanilla's median / the method's median (None if either never reached,
    inf if the method is there at x = 0 and vanilla is not). Without a vanilla gain every cell is
    empty (Targets.gain)."""
    rows = []
    none = Spread(None, None, None, 0, 0)
    for method, pairs in by_method.items():
        if tg.gain <= 0:
            steps = wall = {f: none for f in tg.values}
        else:
            steps = {f: spread([first_crossing(s, t) for s, _ in pairs]) for f, t in tg.values.items()}
            wall = {f: spread([first_crossing(w, t) for _, w in pairs]) for f, t in tg.values.items()}
        final = spread([s.y[-1] for s, _ in pairs if len(s)])
        rows.append(SpeedupRow(method, len(pairs), final, steps, wall, {}, {}))
    base = next((r for r in rows if r.method == BASELINE), None)
    for r in rows:
        for f in tg.values:
            r.step_speedup[f] = ratio(base.steps[f].median, r.steps[f].median) if base else None
            r.wall_speedup[f] = ratio(base.wall[f].median, r.wall[f].median) if base else None
    return sorted(rows, key=lambda r: (r.method != BASELINE, r.method))


def ratio(baseline: float | None, method: float | None) -> float | None:
    """baseline / method for 'x to target' numbers; None when either is missing."""
    if baseline is None or method is None:
        return None
    if method == 0:
        return 1.0 if baseline == 0 else math.inf
    return baseline / method


def cumulative(steps: list[int], seconds: list[float]) -> dict[int, float]:
    """Cumulative sum of per-step seconds: {step: seconds spent up to and including it}."""
    total, out = 0.0, {}
    for s, sec in sorted(zip(steps, seconds)):
        total += sec
        out[s] = total
    return out


def wall_at(eval_steps: list[float], cum: dict[int, float]) -> list[float | None]:
    """Wall seconds at each evaluated step from cumulative `timing/step` (0 at step 0; None if the
    step's timing was not logged)."""
    out: list[float | None] = []
    for s in eval_steps:
        out.append(0.0 if s == 0 else cum.get(int(s)))
    return out
