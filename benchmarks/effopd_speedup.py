"""EffOPD's speed-up on the embedded task, through the real pipeline (`foresight run` of one sweep:
Ray actors, ZeRO-3 learner, two trials at a time), on the shipped models.

    python benchmarks/effopd_speedup.py [--lrs 1e-5,3e-5,1e-4,4e-4] [--seeds 0,1,2,3,4] [--steps 300]

Every EffOPD row also reports, per search step, the cosine between consecutive extrapolation
directions and their norm ratio (`directions`), and how many searches accepted a candidate.

Per lr (the grid spans the stability edge: at 4e-4 the first step already costs accuracy):
  vanilla          OPD, full-vocabulary reverse KL (`loss.type: full_reverse_kl`)
  effopd           today's defaults: the paper's rule (ladder 2k, k = 1..5, '>=', no zero-tie guard,
                   t = 2^n), V = greedy accuracy on |D_v| = 50, the authors' parameters (attention and
                   MLP weights by name: `method.params: attn_mlp`)
  effopd_prev      the defaults before: every tensor moves (`params: all`), zero-tie guard on
  effopd_authors   as the authors' verl fork ran it: attn_mlp, V = one sample per item at T = 1.0
                   (`score: sampled`, seeded), accept on '>' (their code), no guard
  effopd_rank1     beyond the paper: each matrix jumps along the leading singular direction of its
                   Delta (`subspace: rank1`, as RELEX does for RLVR), today's defaults otherwise
  effopd_wide      beyond the paper (not at the highest lr): ladder [0.5, 1, 2, 4, 8, 16], V = -reverse
                   KL to the teacher on 200 D_v prompts (denser), same rule and cadence
At the lowest lr also fixed_extrapolation (k = 1, always jump). The methods comparison
(`methods.json`) adds the papers' sampled-token loss (`pg_reverse_kl`, lr 1e-4, where it learns):
vanilla_pg and ExOPD (lam 1.25, G-OPD reward extrapolation).

For each lr and seed the target at fraction f is acc0 + f (vanilla final - acc0) (vanilla of the
same seed and horizon H = --steps); steps-to-target is the first evaluated step at or above it
(evaluations every --eval-every steps and at 1, 2, 4, ... on the 500 held-out prompts); speed-up =
vanilla's steps / the method's, per seed; reported as median [min, max] over seeds, with the
same for cumulative training wall time and the final accuracy. Writes
benchmarks/results/effopd_speedup.json and methods.json (settings, machine and the models'
sha256 inside) and logs to MLflow (experiment `benchmarks`). Runs already finished in --out-dir
are reused (`foresight run` skips them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dashboards.compare import FRACTIONS, RunCurve, first_reach, load_curves, plot  # noqa: E402
from step_overhead import log_benchmark  # noqa: E402

SWEEP = "effopd_speedup"
WIDE = {"method.type": "effopd", "method.ladder": [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], "method.score": "teacher_kl",
        "method.val_size": 200}
METHODS = {
    "vanilla": {"method.type": "vanilla"},
    "effopd": {"method.type": "effopd"},
    "effopd_prev": {"method.type": "effopd", "method.params": "all", "method.zero_guard": True},
    "effopd_authors": {"method.type": "effopd", "method.params": "attn_mlp", "method.zero_guard": False,
                       "method.score": "sampled", "method.comparison": ">"},
    "effopd_rank1": {"method.type": "effopd", "method.subspace": "rank1"},
    "effopd_wide": WIDE,
    "fixed": {"method.type": "fixed_extrapolation", "method.k": 1},
    "vanilla_pg": {"method.type": "vanilla", "loss.type": "pg_reverse_kl"},
    "exopd_pg": {"method.type": "exopd", "method.lam": 1.25, "loss.type": "pg_reverse_kl"},
}


def trials(lrs: list[float], seeds: list[int], pg_lr: float) -> list[dict]:
    out = []
    for lr in lrs:
        labels = ["vanilla", "effopd", "effopd_prev", "effopd_authors", "effopd_rank1"] + (["effopd_wide"] if lr < max(lrs) else []) + (["fixed"] if lr == min(lrs) else [])
        out += [{"name": f"{m}_lr{lr:g}_s{s}", "learner.lr": lr, "run.seed": s, **METHODS[m]} for m in labels for s in seeds]
    out += [{"name": f"{m}_lr{pg_lr:g}_s{s}", "learner.lr": pg_lr, "run.seed": s, **METHODS[m]}
            for m in ("vanilla_pg", "exopd_pg") for s in seeds]
    return out


def spread(values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def table(curves: list[RunCurve], baseline: str) -> dict:
    """Per method: step and wall speed-up at each f (median [min, max] over seeds), final accuracy."""
    base = {c.seed: c for c in curves if c.method == baseline}
    out = {}
    for method in sorted({c.method for c in curves}, key=lambda m: (m != baseline, m)):
        rows = [c for c in curves if c.method == method and c.seed in base]
        cell: dict = {"final_acc": spread([c.final for c in rows]),
                      "vanilla_final_acc": spread([base[c.seed].final for c in rows])}
        for kind, axis in (("step", "steps"), ("wall", "wall")):
            cell[kind] = {}
            for f in FRACTIONS:
                values = []
                for c in rows:
                    b = base[c.seed]
                    target = b.acc0 + f * (b.final - b.acc0)
                    vb, vm = first_reach(getattr(b, axis), b.acc, target), first_reach(getattr(c, axis), c.acc, target)
                    values.append(math.nan if math.isinf(vb) else (vb / vm if 0 < vm < math.inf else
                                                                   (math.inf if vm == 0 else 0.0)))
                cell[kind][str(f)] = spread(values)
        out[method] = cell
    return out


def render(tab: dict) -> str:
    head = f"{'method':<14}{'final acc':>11}" + "".join(f"{'steps x@' + str(f):>20}" for f in FRACTIONS)
    lines = [head]
    for method, cell in tab.items():
        s = "".join(f"{_fmt(cell['step'][str(f)]):>20}" for f in FRACTIONS)
        lines.append(f"{method:<14}{cell['final_acc']['median'] or math.nan:>11.3f}{s}")
    return "\n".join(lines)


def _fmt(sp: dict) -> str:
    return "-" if sp["median"] is None else f"{sp['median']:.2f} [{sp['min']:.2f},{sp['max']:.2f}]"


def directions(uri: str) -> dict:
    """Why a jump pays or not, per lr and EffOPD variant (median [min, max] over seeds at each search
    step t): cos(Delta_{n-1}, Delta_n) and ||Delta_n|| / ||Delta_{n-1}|| over all parameters
    (`direction/cos/all`, `direction/norm_ratio/all`), and how many searches accepted a candidate."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(SWEEP)
    rows: dict[str, dict[str, dict]] = {}
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        name = (run.info.run_name or "").removeprefix(f"{SWEEP}_")
        if "_lr" not in name or "effopd/accepted_k" not in run.data.metrics:
            continue
        label, lr = name.rsplit("_lr", 1)[0], name.rsplit("_lr", 1)[1].rsplit("_s", 1)[0]
        cell = rows.setdefault(lr, {}).setdefault(label, {"cos": {}, "norm_ratio": {}, "accepted": []})
        for key, short in (("direction/cos/all", "cos"), ("direction/norm_ratio/all", "norm_ratio")):
            for m in client.get_metric_history(run.info.run_id, key):
                cell[short].setdefault(str(m.step), []).append(m.value)
        accepted = client.get_metric_history(run.info.run_id, "effopd/accepted_k")
        cell["accepted"].append(sum(1 for m in accepted if m.value > 0))
    return {lr: {label: {"cos_by_search_step": {t: spread(v) for t, v in sorted(c["cos"].items(), key=lambda x: int(x[0]))},
                         "norm_ratio_by_search_step": {t: spread(v) for t, v in sorted(c["norm_ratio"].items(),
                                                                                       key=lambda x: int(x[0]))},
                         "accepted_searches_per_run": c["accepted"]}
                 for label, c in cells.items()} for lr, cells in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", default="1e-5,1e-4,4e-4")
    parser.add_argument("--pg-lr", type=float, default=1e-4)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_effopd"))
    args = parser.parse_args()
    lrs, seeds = [float(x) for x in args.lrs.split(",")], [int(s) for s in args.seeds.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = {"sweep": SWEEP, "base": {
        "run": {"steps": args.steps, "output_dir": str(out)}, "learner": {"world_size": 1},
        "loss": {"type": "full_reverse_kl"}, "rollout": {"batch_prompts": 64, "max_new_tokens": 6},
        "method": {"type": "vanilla"}, "eval": {"every": args.eval_every, "at_powers_of_two": True},
        "geometry": {"every": 0}, "checkpoint": {"every": 0},
        "tracking": {"uri": f"sqlite:///{(out / 'mlflow.db').resolve()}"}},
        "include": [{**t, **({"method.evaluators": "borrowed"} if t.get("method.type") == "effopd" else {})}
                    for t in trials(lrs, seeds, args.pg_lr)]}
    (out / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(out / "sweep.yaml")], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    curves = load_curves(sweep["base"]["tracking"]["uri"], SWEEP)
    for c in curves:  # the label and lr come from the trial name: effopd_speedup_<label>_lr<lr>_s<seed>
        c.method = c.name.removeprefix(f"{SWEEP}_").rsplit("_lr", 1)[0]
    per_lr = {}
    for lr in lrs:
        subset = [c for c in curves if f"_lr{lr:g}_" in c.name and not c.method.endswith("_pg")]
        per_lr[f"{lr:g}"] = {"horizon_steps": args.steps, "lr_times_horizon": lr * args.steps,
                             "table": table(subset, "vanilla")}
        print(f"lr {lr:g}, H = {args.steps} steps (lr*H = {lr * args.steps:.2g}):\n{render(per_lr[f'{lr:g}']['table'])}")
    pg = [c for c in curves if f"_lr{args.pg_lr:g}_" in c.name and c.method.endswith("_pg")]
    pg_table = table(pg, "vanilla_pg")
    print(f"pg_reverse_kl, lr {args.pg_lr:g}:\n{render(pg_table)}")
    prep = json.loads((ROOT / "models" / "addition" / "prepare.json").read_text())
    common = {
        "settings": {"lrs": lrs, "seeds": seeds, "horizon_steps": args.steps, "eval_every": args.eval_every,
                     "eval_examples": 500, "eval_schedule": "every eval_every steps and at 1, 2, 4, 8, ...",
                     "batch_prompts": 64, "learner_world_size": 1, "loss": "full_reverse_kl (pg rows: pg_reverse_kl)",
                     "methods": {k: v for k, v in METHODS.items()}, "effopd_evaluators": "borrowed (rollout engine)",
                     "target": "acc0 + f * (vanilla_final - acc0), per seed, first evaluation at or above it",
                     "speedup": "vanilla steps (or cumulative training seconds) to target / the method's, per seed"},
        "models": {r: {"sha256": prep[r]["sha256"], "test_accuracy": prep[r]["test_accuracy"]} for r in ("teacher", "student")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = ROOT / "benchmarks" / "results"
    speedup = {"benchmark": "effopd_speedup", "per_lr": per_lr, "directions": directions(sweep["base"]["tracking"]["uri"]),
               **common}
    methods = {"benchmark": "methods", "full_reverse_kl_at_lowest_lr": per_lr[f"{min(lrs):g}"],
               "pg_reverse_kl": {"lr": args.pg_lr, "table": pg_table}, **common}
    (results / "effopd_speedup.json").write_text(json.dumps(speedup, indent=2, default=str))
    (results / "methods.json").write_text(json.dumps(methods, indent=2, default=str))
    plot([c for c in curves if f"_lr{min(lrs):g}_" in c.name and c.seed == str(seeds[0])], results / "effopd_speedup.png")
    log_benchmark(speedup, "effopd_speedup")
    log_benchmark(methods, "methods")
    print(f"wrote {results / 'effopd_speedup.json'} and methods.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
