"""EffOPD speed-up on the embedded task: vanilla vs effopd vs fixed_extrapolation vs exopd,
several seeds and learning rates, through the real pipeline (Ray actors, ZeRO-3 learner).

    python benchmarks/effopd_speedup.py [--lrs 3e-6,1e-5,3e-5] [--default-lr 3e-6] [--seeds 0,1,2] [--steps 1000]

All four methods run at the default lr (the smallest: the paper's regime is lr far below the
stability edge, 1e-6 at 1.5B-32B); the other lrs run vanilla and effopd. For each lr and seed,
the target at fraction f is acc_0 + f (acc_vanilla_final - acc_0); steps-to-target is the first
evaluated step reaching it (eval every `--eval-every` steps and at 1, 2, 4, ... on the 500
held-out prompts); speed-up = vanilla's steps / the method's (median over seeds); the same
with cumulative wall time. Writes benchmarks/results/effopd_speedup.json
(`median_step_speedup` keyed "0.5"/"0.75"/"0.9" for effopd at the default lr) and
effopd_speedup.png, and logs every run to MLflow (experiment `effopd_speedup`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dashboards.compare import RunCurve, load_curves, plot, render, speedup_table  # noqa: E402
from orchestrator.cli import connect_ray  # noqa: E402
from orchestrator.config import validate  # noqa: E402
from orchestrator.plan import resolve  # noqa: E402
from orchestrator.trainer import OPDTrainer  # noqa: E402
from step_overhead import log_benchmark  # noqa: E402

METHODS = {
    "vanilla": {"type": "vanilla"},
    "effopd": {"type": "effopd"},
    "fixed_extrapolation": {"type": "fixed_extrapolation", "k": 1},
    "exopd": {"type": "exopd", "lam": 1.25},
}


def run_trial(method: str, lr: float, seed: int, args, out: Path) -> None:
    name = f"{method}_lr{lr:g}_s{seed}"
    if (out / name / "done.json").is_file():
        return
    cfg = validate({
        "run": {"name": name, "steps": args.steps, "seed": seed, "output_dir": str(out)},
        "learner": {"lr": lr, "world_size": 2}, "loss": {"type": args.loss},
        "rollout": {"batch_prompts": 64, "max_new_tokens": 6},
        "method": {**METHODS[method], **({"score": args.score} if method == "effopd" else {})},
        "eval": {"every": args.eval_every, "at_powers_of_two": True}, "checkpoint": {"every": 0},
        "tracking": {"uri": args.uri, "experiment": "effopd_speedup"},
    })
    plan = resolve(cfg)
    connect_ray(plan.available_cpus)
    trainer = OPDTrainer(cfg, plan, resume=False, show_progress=False)
    t0 = time.time()
    try:
        final = trainer.run()
    finally:
        trainer.shutdown()
    print(f"{name}: final accuracy {final.get('eval/accuracy', float('nan')):.3f} ({time.time() - t0:.0f}s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", default="3e-6,1e-5,3e-5")
    parser.add_argument("--default-lr", type=float, default=3e-6)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000, help="steps of runs not yet in --out-dir")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--loss", default="full_reverse_kl")
    parser.add_argument("--score", default="accuracy", choices=["accuracy", "teacher_kl"], help="EffOPD validation score")
    parser.add_argument("--methods", default="vanilla,effopd,fixed_extrapolation,exopd", help="methods at the default lr")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_effopd"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    for lr in lrs:
        methods = args.methods.split(",") if lr == args.default_lr else ["vanilla", "effopd"]
        for seed in seeds:
            for method in methods:
                run_trial(method, lr, seed, args, out)
    curves = load_curves(args.uri, "effopd_speedup")
    per_lr: dict[str, dict] = {}
    for lr in lrs:
        tag = f"lr{lr:g}_"
        subset = [RunCurve(c.name, c.method, c.seed, c.steps, c.acc, c.wall) for c in curves if tag in c.name]
        per_lr[f"{lr:g}"] = {"table": speedup_table(subset),
                             "acc0": subset[0].acc0 if subset else None,
                             "steps": max((c.steps[-1] for c in subset), default=0),
                             "eval_points": max((len(c.steps) for c in subset), default=0)}
        h = per_lr[f"{lr:g}"]["steps"]
        print(f"lr {lr:g}, {h} steps (lr*H = {lr * h:.2g}):\n{render(per_lr[f'{lr:g}']['table'])}")
    default = per_lr[f"{args.default_lr:g}"]["table"]
    result = {
        "benchmark": "effopd_speedup",
        "median_step_speedup": default["effopd"]["step"],
        "median_wall_speedup": default["effopd"]["wall"],
        "default_lr": args.default_lr,
        "per_lr": per_lr,
        "settings": {"lrs": lrs, "seeds": seeds, "steps": args.steps, "eval_every": args.eval_every,
                     "eval_examples": 500, "loss": args.loss, "batch_prompts": 64, "val_size": 50,
                     "validation_score": args.score, "comparison": ">=", "learner_world_size": 2,
                     "eval_schedule": "every eval_every steps and at 1, 2, 4, 8, ...",
                     "fixed_extrapolation_k": 1, "exopd_lambda": 1.25,
                     "target": "acc0 + f * (vanilla_final - acc0), per seed",
                     "note": "per_lr[...].steps gives each lr's horizon H; runs already in --out-dir are reused"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "seconds": round(time.time() - t0),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = ROOT / "benchmarks" / "results"
    (results / "effopd_speedup.json").write_text(json.dumps(result, indent=2, default=str))
    plot([c for c in curves if f"lr{args.default_lr:g}_" in c.name], results / "effopd_speedup.png")
    log_benchmark(result, "effopd_speedup")
    print(f"wrote {results / 'effopd_speedup.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
