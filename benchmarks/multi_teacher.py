"""Several teachers per run at CPU size: the math-twin student distilled from two specialist teachers
routed by `data_source` (sums to one, fractions to the other), against each specialist alone and
the generalist twin teacher.

1. `teachers` step: builds models/math_twin_specialists/{sums,fractions} (the twin teacher's
   architecture, tokenizer and recipe, SFT on one domain's problems only, to 0.95 greedy accuracy
   on that domain's test problems), cached by their record.
2. `runs` step: experiments/math_twin.yaml on the twin's data with `data_source` set per domain
   (`foresight/math_twin/sum`, `.../fraction`; task.group_key), pg_reverse_kl at lr 1e-4, 60
   steps, seeds 0 and 1, for: routed (both specialists), sums specialist alone, fractions specialist
   alone, generalist. Final test accuracy overall and per domain (`eval/group/*`).

Writes benchmarks/results/multi_teacher.json (machine, settings, the models' checksums) and logs it
to MLflow (experiment `benchmarks`).
    python benchmarks/multi_teacher.py [teachers|runs|all]
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

TWIN = ROOT / "experiments" / "math_twin.yaml"
OUT = ROOT / "models" / "math_twin_specialists"
DOMAINS = {"sums": "sum", "fractions": "fraction"}
TARGET = 0.95
SEEDS = (0, 1)
COMMON = ["loss.type=pg_reverse_kl", "learner.lr=1.0e-4", "run.steps=60", "eval.every=30", "checkpoint.every=0",
          "eval.num_examples=500", "eval.sets={}", "task.group_key=data_source"]


def domain(question: str) -> str:
    return "fraction" if "/" in question else "sum"


def build_teachers() -> dict:
    """Both specialists (cached by their record)."""
    import torch

    from core.modeling import load_tokenizer, quiet_hf
    from core.task import Example, Task, math_verify_reward
    from orchestrator.prepare import RECIPES, WORKLOADS, init_model, sha256, train_sft
    from orchestrator.twin import problems, render

    recipe, wl = RECIPES["default"], WORKLOADS["math_twin"]
    twin = json.loads((ROOT / "models" / "math_twin" / "prepare.json").read_text())
    want = {"target": TARGET, "recipe": twin["recipe"], "teacher_arch": twin["teacher_arch"], "task": twin["task"]}
    record = OUT / "prepare.json"
    if record.is_file() and {k: json.loads(record.read_text()).get(k) for k in want} == want:
        return json.loads(record.read_text())
    quiet_hf()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(ROOT / "models" / "math_twin" / "teacher")
    train, test = problems(twin["task"]["train_size"], twin["task"]["test_size"])
    out = dict(want)
    for name, dom in DOMAINS.items():
        task = Task(train=[Example(render(tokenizer, q), s) for q, _, s in train if domain(q) == dom],
                    test=[Example(render(tokenizer, q), g) for q, g, _ in test if domain(q) == dom], reward=math_verify_reward)
        model = init_model(wl.teacher_arch, tokenizer, recipe.seed * 100 + 1, wl.family)
        t0 = time.time()
        steps, acc = train_sft(model, tokenizer, task, lr=recipe.teacher_lr, recipe=recipe, max_new_tokens=wl.max_new_tokens,
                               stop=lambda a: a >= TARGET, label=f"specialist {name}")
        model.eval()
        model.save_pretrained(OUT / name, safe_serialization=True)
        tokenizer.save_pretrained(OUT / name)
        out[name] = {"domain": dom, "sft_steps": steps, "stop_accuracy": acc, "train_problems": len(task.train),
                     "seconds": round(time.time() - t0, 1), "sha256": sha256(OUT / name / "model.safetensors")}
        print(f"specialist {name}: {json.dumps(out[name])}", flush=True)
    record.write_text(json.dumps(out, indent=2))
    return out


def routed_data(folder: Path) -> list[str]:
    """The twin's splits with data_source naming each problem's domain; the overrides pointing at them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        rows = pq.read_table(ROOT / "models" / "math_twin" / "data" / f"{split}.parquet").to_pylist()
        for r in rows:
            r["data_source"] = f"foresight/math_twin/{domain(r['prompt'][0]['content'])}"
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    return [f"task.train_path={folder / 'train.parquet'}", f"task.test_path={folder / 'test.parquet'}"]


def arms() -> dict[str, list[str]]:
    routed = {f"foresight/math_twin/{d}": n for n, d in DOMAINS.items()}
    return {
        "routed_specialists": [f"models.teacher={OUT / 'sums'}", f"models.teachers={{fractions: {OUT / 'fractions'}}}",
                               "teacher.route={" + ", ".join(f"{g}: {t}" for g, t in routed.items() if t != "sums") + "}"],
        "sums_specialist_alone": [f"models.teacher={OUT / 'sums'}"],
        "fractions_specialist_alone": [f"models.teacher={OUT / 'fractions'}"],
        "generalist": [f"models.teacher={ROOT / 'models' / 'math_twin' / 'teacher'}"],
    }


def run(name: str, out: Path, extra: list[str], seed: int) -> dict:
    from mlflow.tracking import MlflowClient

    args = [*COMMON, *extra, f"run.seed={seed}", f"run.name={name}", f"run.output_dir={out}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.experiment=multi"]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(TWIN), *args], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    r = client.search_runs([client.get_experiment_by_name("multi").experiment_id], f"tags.mlflow.runName = '{name}'")[0]
    last = lambda key: sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)  # noqa: E731
    out_row = {"accuracy_before": last("eval/accuracy")[0].value, "accuracy_after": last("eval/accuracy")[-1].value,
               "seconds": round(time.time() - t0, 1)}
    for d in DOMAINS.values():
        hist = last(f"eval/group/foresight_math_twin_{d}/accuracy")
        out_row[f"{d}_before"], out_row[f"{d}_after"] = hist[0].value, hist[-1].value
    return out_row


def runs(record: dict) -> dict:
    twin = json.loads((ROOT / "models" / "math_twin" / "prepare.json").read_text())
    rows: dict[str, list[dict]] = {name: [] for name in arms()}
    with tempfile.TemporaryDirectory() as tmp:
        data = routed_data(Path(tmp))
        for seed in SEEDS:
            for name, extra in arms().items():
                rows[name].append(run(f"{name}_s{seed}", Path(tmp), [*data, *extra], seed))
                print(name, seed, json.dumps(rows[name][-1]), flush=True)
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    keys = ["accuracy_before", "accuracy_after"] + [f"{d}_{w}" for d in DOMAINS.values() for w in ("before", "after")]
    return {
        "benchmark": "multi_teacher", "settings": {"config": str(TWIN.relative_to(ROOT)), "overrides": COMMON,
                                                   "seeds": SEEDS, "arms": arms()},
        "teachers": {**{n: record[n] for n in DOMAINS}, "generalist": {"sha256": twin["teacher"]["sha256"],
                                                                        "test_accuracy": twin["teacher"]["test_accuracy"]}},
        "student": {"sha256": twin["student"]["sha256"], "test_accuracy": twin["student"]["test_accuracy"]},
        "runs": rows, "summary": {name: {k: mean(k, rs) for k in keys} for name, rs in rows.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> int:
    step = sys.argv[1] if len(sys.argv) > 1 else "all"
    record = build_teachers()
    if step == "teachers":
        return 0
    from step_overhead import save_result

    result = runs(record)
    dest = ROOT / "benchmarks" / "results" / "multi_teacher.json"
    save_result(result, dest, "multi_teacher")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
