"""Compare the runs of one MLflow experiment (a sweep): prints the speed-up table and, with
--out, writes the dashboard there (the same page as `foresight dashboard`, dashboards/dashboard.py).

    python -m dashboards.compare --experiment demo [--uri sqlite:///runs/mlflow.db] [--out DIR]

The functions below (RunCurve, load_curves, speedup_table, plot, render) are the per-seed paired
comparison that benchmarks/effopd_speedup.py records in its JSON (also in --out/comparison.json);
the dashboard uses dashboards/metrics.py (one target per panel from the vanilla medians).

Per-seed speed-up at fraction f: with a_0 the step-0 accuracy and a_V the same seed's vanilla
final accuracy, the target is a_0 + f (a_V - a_0); a method's steps-to-target is the first
evaluated step whose accuracy reaches it, and its speed-up is vanilla's steps-to-target divided
by its own (median over seeds). Wall-time speed-up uses the cumulative `timing/step` instead.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dashboards.metrics import Curve, first_crossing

FRACTIONS = (0.5, 0.75, 0.9)


@dataclass
class RunCurve:
    name: str
    method: str
    seed: str
    steps: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    """Cumulative training wall time (s) at each evaluated step."""

    @property
    def acc0(self) -> float:
        return self.acc[0]

    @property
    def final(self) -> float:
        return self.acc[-1]


def first_reach(xs: list[float], acc: list[float], target: float) -> float:
    """The x (step or seconds) of the first evaluation with accuracy >= target (inf if never)."""
    x = first_crossing(Curve(list(xs), list(acc)), target)
    return math.inf if x is None else x


def speedup_table(curves: list[RunCurve], fractions=FRACTIONS, baseline: str = "vanilla") -> dict:
    """{method: {"step": {f: median speed-up}, "wall": {...}, "final_acc": median}} against `baseline`."""
    by_seed = {c.seed: c for c in curves if c.method == baseline}
    out: dict = {}
    for method in sorted({c.method for c in curves}):
        step_sp: dict[str, list[float]] = defaultdict(list)
        wall_sp: dict[str, list[float]] = defaultdict(list)
        finals = []
        for c in (c for c in curves if c.method == method):
            finals.append(c.final)
            base = by_seed.get(c.seed)
            if base is None:
                continue
            for f in fractions:
                target = base.acc0 + f * (base.final - base.acc0)
                vs, ms = first_reach(base.steps, base.acc, target), first_reach(c.steps, c.acc, target)
                vw, mw = first_reach(base.wall, base.acc, target), first_reach(c.wall, c.acc, target)
                step_sp[str(f)].append(vs / ms if ms > 0 and not math.isinf(ms) else (math.inf if ms == 0 else 0.0))
                wall_sp[str(f)].append(vw / mw if mw > 0 and not math.isinf(mw) else (math.inf if mw == 0 else 0.0))
        out[method] = {
            "step": {f: statistics.median(v) for f, v in step_sp.items()},
            "wall": {f: statistics.median(v) for f, v in wall_sp.items()},
            "final_acc": statistics.median(finals) if finals else math.nan,
            "runs": len(finals),
        }
    return out


def load_curves(uri: str, experiment: str) -> list[RunCurve]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no MLflow experiment '{experiment}' at {uri}")
    curves = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if "eval/accuracy" not in run.data.metrics or run.info.status != "FINISHED":
            continue  # a sweep's parent run, or a failed / pruned / unfinished trial
        acc = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy"))
        step_times = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "timing/step"))
        total, wall_at = 0.0, {}
        for step, sec in step_times:
            total += sec
            wall_at[step] = total
        wall = [wall_at.get(s, 0.0) if s else 0.0 for s, _ in acc]
        tags = run.data.tags
        curves.append(RunCurve(tags.get("mlflow.runName", run.info.run_id), tags.get("method", "?"),
                               tags.get("seed", "0"), [s for s, _ in acc], [v for _, v in acc], wall))
    return sorted(curves, key=lambda c: (c.method, c.seed))


def plot(curves: list[RunCurve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        ax1.plot(c.steps, c.acc, label=f"{c.method} s{c.seed}")
        ax2.plot(c.wall, c.acc, label=f"{c.method} s{c.seed}")
    ax1.set(xlabel="step", ylabel="test accuracy", title="accuracy vs step")
    ax2.set(xlabel="training wall time (s)", ylabel="test accuracy", title="accuracy vs wall time")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(table: dict) -> str:
    lines = [f"{'method':<22}{'runs':>5}{'final acc':>11}" + "".join(f"{'x@' + f:>9}" for f in map(str, FRACTIONS))
             + "   (step speed-up vs vanilla at f of its gain)"]
    for method, row in table.items():
        lines.append(f"{method:<22}{row['runs']:>5}{row['final_acc']:>11.3f}"
                     + "".join(f"{row['step'].get(str(f), math.nan):>9.2f}" for f in FRACTIONS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the sweep name)")
    parser.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    parser.add_argument("--out", default=None, help="folder for the dashboard (dashboard.html + PNGs) and comparison.json")
    args = parser.parse_args(argv)
    from dashboards.dashboard import build
    from dashboards.mlflow_ui import ui_command
    from dashboards.page import text_tables
    from dashboards.store import NotFound
    from orchestrator.tracking import resolve_uri

    uri = resolve_uri(args.uri, Path("runs"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        try:
            result = build(uri, args.experiment, out, log_artifacts=bool(args.out))
        except NotFound as err:
            raise SystemExit(f"error: {err}") from None
    print(text_tables(result.analysis) or "no speed-up table yet (needs vanilla runs with two evaluations)")
    if args.out:
        curves = load_curves(uri, args.experiment)
        (out / "comparison.json").write_text(json.dumps(
            {"experiment": args.experiment, "uri": uri, "table": speedup_table(curves) if curves else {},
             "curves": [c.__dict__ for c in curves]}, indent=2, default=str))
        print(f"dashboard: {result.page.resolve()}")
        if ui_command(uri):
            print(f"MLflow UI: {ui_command(uri)}")
        print(f"then open: {result.ui_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
