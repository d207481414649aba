"""Pipelining vs learning: vanilla OPD on the embedded task with `pipeline.max_staleness` 0 (strictly
on-policy), 1 and 2, several seeds, the same everything else.

    python benchmarks/pipeline_staleness.py [--seeds 0,1,2] [--steps 150] [--staleness 0,1,2]

Per run: test accuracy at step 0 and at the end (greedy, 500 prompts), the mean `timing/step`
(training wall time per step, evaluation steps included), the mean and maximum
`pipeline/staleness` (how many learner steps older than on-policy each batch's sampling weights
were, as the rollout workers report), and the share of steps whose batch was pipelined. One
learner rank, one rollout worker, one teacher (3 processes on the 2 cores), loss `full_reverse_kl`,
lr 1e-4, evaluation every 25 steps (each drains the pipeline). Runs one at a time. Writes
benchmarks/results/pipeline_staleness.json (with the models' sha256) and logs it to MLflow.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
MODELS = ROOT / "models" / "addition"


def run_one(seed: int, staleness: int, steps: int, lr: float, out: Path) -> dict:
    """One vanilla OPD run through OPDTrainer; its accuracy, step time and staleness from MLflow."""
    from step_overhead import run_trainer

    client, rid = run_trainer({
        "run": {"name": f"s{staleness}_seed{seed}", "steps": steps, "seed": seed, "output_dir": str(out)},
        "models": {"student": str(MODELS / "student"), "teacher": str(MODELS / "teacher")},
        "learner": {"world_size": 1, "lr": lr}, "loss": {"type": "full_reverse_kl"},
        "rollout": {"batch_prompts": 64, "max_new_tokens": 6},
        "eval": {"every": 25}, "checkpoint": {"every": 0}, "geometry": {"every": 0},
        "pipeline": {"max_staleness": staleness},
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "staleness"}})

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.step)]

    acc, stale, step = series("eval/accuracy"), series("pipeline/staleness"), series("timing/step")
    return {"seed": seed, "staleness_bound": staleness, "acc0": acc[0], "final_accuracy": acc[-1],
            "accuracy_curve": acc, "mean_step_s": statistics.mean(step[1:]), "median_step_s": statistics.median(step[1:]),
            "mean_staleness": statistics.mean(stale), "max_staleness": max(stale),
            "pipelined_share": sum(1 for s in stale if s > 0) / len(stale)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--staleness", default="0,1,2")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_staleness.json"))
    args = parser.parse_args()
    import ray
    import torch

    from step_overhead import save_result

    seeds, bounds = [int(s) for s in args.seeds.split(",")], [int(s) for s in args.staleness.split(",")]
    runs, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for s in bounds:
            for seed in seeds:
                r = run_one(seed, s, args.steps, args.lr, Path(tmp) / f"s{s}_seed{seed}")
                runs.append(r)
                print(f"staleness <= {s}, seed {seed}: accuracy {r['acc0']:.3f} -> {r['final_accuracy']:.3f}, "
                      f"{r['mean_step_s'] * 1e3:.0f} ms/step, mean staleness {r['mean_staleness']:.2f}, "
                      f"pipelined {r['pipelined_share']:.0%} of steps", flush=True)
    ray.shutdown()
    summary = {}
    for s in bounds:
        rows = [r for r in runs if r["staleness_bound"] == s]
        summary[f"staleness_{s}"] = {
            "final_accuracy_mean": statistics.mean(r["final_accuracy"] for r in rows),
            "final_accuracy_min": min(r["final_accuracy"] for r in rows),
            "final_accuracy_max": max(r["final_accuracy"] for r in rows),
            "mean_step_s": statistics.mean(r["mean_step_s"] for r in rows),
            "max_staleness": max(r["max_staleness"] for r in rows)}
    base = summary[f"staleness_{bounds[0]}"]["mean_step_s"]
    for s in bounds:
        summary[f"staleness_{s}"]["step_time_vs_first"] = summary[f"staleness_{s}"]["mean_step_s"] / base
    digest = {role: hashlib.sha256((MODELS / role / "model.safetensors").read_bytes()).hexdigest()
              for role in ("student", "teacher")}
    result = {"benchmark": "pipeline_staleness", "summary": summary, "runs": runs,
              "settings": {"steps": args.steps, "seeds": seeds, "staleness": bounds, "lr": args.lr,
                           "loss": "full_reverse_kl", "batch_prompts": 64, "max_new_tokens": 6, "world_size": 1,
                           "eval_every": 25, "method": "vanilla"},
              "models": {"path": "models/addition", "sha256": digest},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "duration_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    save_result(result, args.out, "pipeline_staleness")
    for s in bounds:
        row = summary[f"staleness_{s}"]
        print(f"staleness <= {s}: final accuracy {row['final_accuracy_mean']:.3f} "
              f"[{row['final_accuracy_min']:.3f}, {row['final_accuracy_max']:.3f}], "
              f"{row['mean_step_s'] * 1e3:.0f} ms/step ({row['step_time_vs_first']:.2f}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
