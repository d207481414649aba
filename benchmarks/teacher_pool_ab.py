"""A sweep on one shared teacher pool against the same sweep with a teacher per trial: 4 trials
(seeds 0-3 of experiments/smoke.yaml's model pair, pg_reverse_kl, 8 steps, one learner rank each,
two trials at a time on 2 CPUs), every train/* and eval/* metric of every trial compared
step by step for equality, and both sweeps' wall time.

Writes benchmarks/results/teacher_pool_ab.json (machine, settings, the models' checksums) and logs
it to MLflow (experiment `benchmarks`).
    python benchmarks/teacher_pool_ab.py           # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SWEEP = """\
sweep: pooled
base:
  run: {steps: 8, seed: 0}
  learner: {lr: 4.0e-4, world_size: 1}
  loss: {type: pg_reverse_kl}
  rollout: {batch_prompts: 16, max_new_tokens: 6}
  eval: {every: 4, num_examples: 32}
  checkpoint: {every: 0}
  tracking: {experiment: pooled}
matrix:
  run.seed: [0, 1, 2, 3]
"""
MODELS = ROOT / "models" / "addition"


def sweep(folder: Path, shared: bool) -> tuple[dict, float]:
    """Run the sweep; {trial: {metric: [(step, value)]}} and its wall seconds."""
    from mlflow.tracking import MlflowClient

    (folder / "sweep.yaml").write_text(SWEEP)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(folder / "sweep.yaml"), f"models.student={MODELS / 'student'}",
                    f"models.teacher={MODELS / 'teacher'}", f"run.output_dir={folder}", f"tracking.uri={uri}",
                    f"teacher.shared={str(shared).lower()}"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - t0
    client = MlflowClient(uri)
    out = {}
    for r in client.search_runs([client.get_experiment_by_name("pooled").experiment_id]):
        if r.data.tags.get("mlflow.parentRunId"):
            out[r.info.run_name] = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                                    for k in r.data.metrics if k.startswith(("train/", "eval/"))}
    return out, seconds


def main() -> int:
    from step_overhead import save_result

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shared").mkdir()
        (Path(tmp) / "own").mkdir()
        shared, shared_s = sweep(Path(tmp) / "shared", True)
        own, own_s = sweep(Path(tmp) / "own", False)
    differing = {n: [k for k in own[n] if shared.get(n, {}).get(k) != own[n][k]] for n in own}
    prep = json.loads((MODELS / "prepare.json").read_text())
    result = {
        "benchmark": "teacher_pool_ab", "settings": {"sweep": SWEEP, "models": str(MODELS.relative_to(ROOT))},
        "trials": sorted(own), "metrics_per_trial": len(next(iter(own.values()))),
        "values_compared": sum(len(v) for t in own.values() for v in t.values()),
        "identical": not any(differing.values()) and sorted(shared) == sorted(own), "differing": differing,
        "seconds": {"shared_pool": round(shared_s, 1), "teacher_per_trial": round(own_s, 1)},
        "models": {r: prep.get(r, {}).get("sha256") for r in ("teacher", "student")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    dest = ROOT / "benchmarks" / "results" / "teacher_pool_ab.json"
    save_result(result, dest, "teacher_pool_ab")
    print(f"{len(own)} trials, {result['values_compared']} metric values: identical {result['identical']}; "
          f"wall {shared_s:.0f} s shared vs {own_s:.0f} s own")
    print(f"wrote {dest}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
