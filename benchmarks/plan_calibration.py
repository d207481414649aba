"""The planner's cost model, calibrated end to end on CPU: calibrate from one run of the math twin,
plan another configuration with the fit, run it, and compare the predicted step time with the
measured one (and with what the uncalibrated defaults predicted).

Run A (the calibration): experiments/math_twin.yaml, batch 64 prompts, 1 rollout worker.
Run B (the prediction): batch 192 prompts, 2 rollout workers (each samples half the batch; the two
share the machine's 2 cores while the learner and teacher wait). Both: 12 steps, evaluation only at
the last step, no checkpoints, so steps 2-11 are steady. The predicted step leaves evaluation out
(it is amortized over eval.every in the plan; the measured median skips evaluation steps).

Writes benchmarks/results/plan_calibration.json (the fit, both predictions, the measured medians,
machine, settings, the models' checksums) and logs it to MLflow (experiment `benchmarks`).
    python benchmarks/plan_calibration.py           # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_overhead import log_benchmark  # noqa: E402

TWIN = ROOT / "experiments" / "math_twin.yaml"
COMMON = ["run.steps=12", "eval.every=100", "checkpoint.every=0", "eval.num_examples=50",
          "eval.sets.held.num_examples=20"]
RUNS = {"A": ["rollout.batch_prompts=64", "rollout.num_workers=1"],
        "B": ["rollout.batch_prompts=192", "rollout.num_workers=2"]}
NOT_STEADY = ("eval", "eval_sets", "search")


def run(name: str, out: Path, extra: list[str]) -> Path:
    args = [*COMMON, *extra, f"run.name={name}", f"run.output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(TWIN), *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return out / name


def predicted(overrides: list[str]) -> dict:
    """The plan's per-step seconds for run B's config (evaluation left out) and where its constants came from."""
    from core.config import load_config
    from orchestrator.plan import resolve

    cfg = load_config(TWIN, [*COMMON, *RUNS["B"], *overrides])
    plan = resolve(cfg, TWIN, cpus=float(os.cpu_count() or 1))
    seconds = dict(plan.cost.seconds)
    steady = plan.cost.step_seconds - sum(seconds.get(k, 0.0) for k in NOT_STEADY)
    return {"step_s": steady, "seconds": seconds, "source": plan.throughput.source}


def measured(run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from core.calibration import steady_steps

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    keys = ("timing/step", "timing/rollout_busy", "timing/teacher_busy", "timing/learner_busy", "timing/sync",
            "timing/eval", "timing/search")
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    steps = steady_steps(history)
    return {"steps": steps, **{k.split("/")[1]: statistics.median(history[k][s] for s in steps) for k in keys[:5]}}


def main() -> int:
    from orchestrator.calibrate import calibrate

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        a = run("calib_a", out, RUNS["A"])
        path, cal, notes = calibrate(a)
        before = predicted([])
        after = predicted([f"plan.calibration={path}"])
        b = measured(run("calib_b", out, RUNS["B"]))
        a_measured = measured(a)
    error = lambda p: p["step_s"] / b["step"] - 1  # noqa: E731
    prep = json.loads((ROOT / "models" / "math_twin" / "prepare.json").read_text())
    result = {
        "benchmark": "plan_calibration",
        "calibration_run": {"overrides": COMMON + RUNS["A"], "measured": a_measured},
        "fit": {"throughput": {k: v for k, v in cal.throughput.__dict__.items()}, "fill": cal.fill,
                "prompt_len": cal.prompt_len, "notes": notes},
        "prediction_run": {"overrides": COMMON + RUNS["B"], "measured": b},
        "predicted_defaults": before, "predicted_calibrated": after,
        "error_defaults": error(before), "error_calibrated": error(after),
        "within_25_percent": abs(error(after)) <= 0.25,
        "models": {r: prep.get(r, {}).get("sha256") for r in ("teacher", "student")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"run B step: measured {b['step']:.3f} s; predicted {after['step_s']:.3f} s calibrated "
          f"({error(after):+.1%}), {before['step_s']:.3f} s with defaults ({error(before):+.1%})")
    dest = ROOT / "benchmarks" / "results" / "plan_calibration.json"
    dest.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log_benchmark(result, "plan_calibration")
    print(f"wrote {dest}")
    return 0 if result["within_25_percent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
