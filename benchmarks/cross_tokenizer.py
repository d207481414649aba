"""Cross-tokenizer OPD at CPU size: the math-twin student (its byte-level BPE of 306 tokens) distilled
from a teacher with a different tokenizer (a BPE of 280 tokens trained on the same corpus: "What"
is `Wh`+`at`, "user" `u`+`ser`, ...; different ids throughout), against the same student distilled
from the shared-tokenizer twin teacher, on `pg_reverse_kl` (the loss the cross path serves).

1. `teacher` step: builds models/math_twin_t280/teacher (the twin teacher's architecture and recipe,
   SFT to the same 0.97 target on the same problems rendered in its own tokens), cached by its
   record (`prepare.json` there), ~15-20 min on one core the first time.
2. `runs` step: experiments/math_twin.yaml with loss.type=pg_reverse_kl, for each teacher and seed:
   the run's eval accuracy before and after, reward at the start and the end, and for the cross
   path the chunk statistics the teacher logged.

Writes benchmarks/results/cross_tokenizer.json (machine, settings, the models' checksums) and logs
it to MLflow (experiment `benchmarks`).
    python benchmarks/cross_tokenizer.py [teacher|runs|all]
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
OUT = ROOT / "models" / "math_twin_t280"
VOCAB = 280
SEEDS = (0, 1)
COMMON = ["loss.type=pg_reverse_kl", "learner.lr=1.0e-4", "run.steps=60", "eval.every=30", "checkpoint.every=0"]


def build_teacher() -> dict:
    """The different-tokenizer teacher (cached by its record)."""
    import torch

    from core.modeling import quiet_hf
    from core.task import Example, Task, math_verify_reward
    from orchestrator.prepare import RECIPES, WORKLOADS, init_model, sha256, train_sft
    from orchestrator.twin import build_tokenizer, problems, render

    recipe, wl = RECIPES["default"], WORKLOADS["math_twin"]
    twin = json.loads((ROOT / "models" / "math_twin" / "prepare.json").read_text())
    want = {"vocab_size": VOCAB, "recipe": twin["recipe"], "teacher_arch": twin["teacher_arch"], "task": twin["task"]}
    record = OUT / "prepare.json"
    if record.is_file() and {k: json.loads(record.read_text()).get(k) for k in want} == want \
            and (OUT / "teacher" / "model.safetensors").is_file():
        return json.loads(record.read_text())
    quiet_hf()
    torch.set_num_threads(1)
    train, test = problems(twin["task"]["train_size"], twin["task"]["test_size"])
    corpus = [piece for q, _, s in train for piece in (f"user\n{q}", "\n", f"assistant\n<think>\n\n</think>\n\n{s}")]
    tokenizer = build_tokenizer(corpus, vocab_size=VOCAB)
    task = Task(train=[Example(render(tokenizer, q), s) for q, _, s in train],
                test=[Example(render(tokenizer, q), g) for q, g, _ in test], reward=math_verify_reward)
    model = init_model(wl.teacher_arch, tokenizer, recipe.seed * 100 + 1, wl.family)
    t0 = time.time()
    steps, acc = train_sft(model, tokenizer, task, lr=recipe.teacher_lr, recipe=recipe, max_new_tokens=wl.max_new_tokens,
                           stop=lambda a: a >= recipe.teacher_target, label="teacher t280")
    model.eval()
    model.save_pretrained(OUT / "teacher", safe_serialization=True)
    tokenizer.save_pretrained(OUT / "teacher")
    out = {**want, "teacher": {"sft_steps": steps, "stop_accuracy": acc, "seconds": round(time.time() - t0, 1),
                               "tokens": len(tokenizer), "sha256": sha256(OUT / "teacher" / "model.safetensors")}}
    record.write_text(json.dumps(out, indent=2))
    return out


def run(name: str, out: Path, teacher: Path, seed: int) -> dict:
    from mlflow.tracking import MlflowClient

    args = [*COMMON, f"models.teacher={teacher}", f"run.seed={seed}", f"run.name={name}", f"run.output_dir={out}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.experiment=cross"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(TWIN), *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    r = client.search_runs([client.get_experiment_by_name("cross").experiment_id], f"tags.mlflow.runName = '{name}'")[0]
    hist = lambda key: [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]  # noqa: E731
    acc, reward, chunks = hist("eval/accuracy"), hist("train/reward"), hist("train/cross_chunks_per_token")
    out = {"accuracy_before": acc[0], "accuracy_after": acc[-1], "reward_first5": sum(reward[:5]) / 5,
           "reward_last5": sum(reward[-5:]) / 5, "cross_tokenizer": r.data.params.get("plan/cross_tokenizer", "False"),
           "seconds": round(time.time() - t0, 1)}
    if chunks:
        out["chunks_per_token"] = sum(chunks) / len(chunks)
        out["split_rows"] = sum(hist("train/cross_split_rows")) / len(chunks)
    return out


def runs(record: dict) -> dict:
    twin = json.loads((ROOT / "models" / "math_twin" / "prepare.json").read_text())
    rows: dict[str, list[dict]] = {"shared_tokenizer_teacher": [], "t280_teacher_cross": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            rows["shared_tokenizer_teacher"].append(run(f"shared_s{seed}", Path(tmp), ROOT / "models" / "math_twin" / "teacher", seed))
            rows["t280_teacher_cross"].append(run(f"cross_s{seed}", Path(tmp), OUT / "teacher", seed))
            print(json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    return {
        "benchmark": "cross_tokenizer", "settings": {"config": str(TWIN.relative_to(ROOT)), "overrides": COMMON, "seeds": SEEDS},
        "teachers": {"shared_tokenizer": {"path": "models/math_twin/teacher", "tokens": 306,
                                          "test_accuracy": twin["teacher"]["test_accuracy"], "sha256": twin["teacher"]["sha256"]},
                     "t280": {"path": str(OUT.relative_to(ROOT) / "teacher"), **record["teacher"]}},
        "student": {"sha256": twin["student"]["sha256"], "test_accuracy": twin["student"]["test_accuracy"]},
        "runs": rows,
        "summary": {k: {"accuracy_after": mean("accuracy_after", v), "accuracy_before": mean("accuracy_before", v),
                        "reward_last5": mean("reward_last5", v)} for k, v in rows.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> int:
    step = sys.argv[1] if len(sys.argv) > 1 else "all"
    record = build_teacher()
    print(f"teacher t280: {json.dumps(record['teacher'])}", flush=True)
    if step == "teacher":
        return 0
    from step_overhead import log_benchmark

    result = runs(record)
    dest = ROOT / "benchmarks" / "results" / "cross_tokenizer.json"
    dest.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log_benchmark(result, "cross_tokenizer")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
