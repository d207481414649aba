"""Step overhead: Foresight's OPD step (Ray actors + ZeRO-3 learner + weight sync) vs a
single-process loop doing the same compute (same models, batch, generation, loss, AdamW).

    python benchmarks/step_overhead.py [--steps 40] [--sizes tiny,medium]

ratio = median step time of the project / median step time of the single-process loop (strictly
on-policy; `pipelined_ratio` with pipeline.max_staleness=1; `project_fixed_overhead_s` = step wall
time minus the busy-time critical path, i.e. dispatch, object-store traffic and waits), at the
benchmark's model size (`medium`, a 4-layer d=256 Llama, 4.2M parameters; `tiny` is the embedded
task's student). Writes benchmarks/results/step_overhead.json and logs it to MLflow
(experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from core.modeling import TinyArch, build_tokenizer, gather_logp, generate, init_model, load_model, load_tokenizer, response_logits  # noqa: E402

SIZES = {"medium": TinyArch(hidden=256, layers=4, heads=8, intermediate=1024)}


def build_models(size: str, tmp: Path) -> tuple[Path, Path]:
    """Student/teacher folders: the embedded pair for `tiny`, random-init models otherwise."""
    if size == "tiny":
        base = ROOT / "models" / "addition"
        if not (base / "student" / "config.json").is_file():
            raise SystemExit("run `foresight prepare` (or `make models`) first")
        return base / "student", base / "teacher"
    tok = build_tokenizer()
    paths = []
    for role, seed in (("student", 1), ("teacher", 2)):
        path = tmp / size / role
        init_model(SIZES[size], tok, seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def single_process(student: Path, teacher: Path, steps: int, batch: int, max_new: int, lr: float) -> dict[str, float]:
    """The reference: one process, one thread, the same phases back to back."""
    from core.config import AdditionTask
    from core.losses import LossSpec, TokenBatch, opd_loss
    from core.task import build_addition

    torch.set_num_threads(1)
    tok, s, t = load_tokenizer(student), load_model(student), load_model(teacher)
    task = build_addition(AdditionTask())
    opt = torch.optim.AdamW(s.parameters(), lr=lr, weight_decay=0.0)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        ex = random.Random(step).sample(task.train, batch)
        s.eval()
        b = generate(s, tok, [e.prompt for e in ex], max_new, greedy=False, seed=step)
        with torch.no_grad():
            tl = torch.log_softmax(response_logits(t, b["input_ids"], b["attention_mask"], b["prompt_len"]), -1)
        s.train()
        logits = response_logits(s, b["input_ids"], b["attention_mask"], b["prompt_len"])
        x = TokenBatch(b["response"], b["response_mask"], gather_logp(tl, b["response"]) * b["response_mask"], b["logp"])
        loss, _ = opd_loss(LossSpec("pg_reverse_kl"), logits, x, norm=float(b["response_mask"].sum()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step": statistics.median(times[3:])}


def project(student: Path, teacher: Path, steps: int, batch: int, max_new: int, lr: float, out: Path,
            world_size: int, pipeline_max_staleness: int = 0, loss: str = "pg_reverse_kl",
            extra_metrics: tuple[str, ...] = ()) -> dict[str, float]:
    """The real pipeline via OPDTrainer; medians of its `timing/*` metrics and of `extra_metrics`
    (MLflow names), the first 3 steps and the last one (it also evaluates) dropped."""
    raw = {"run": {"name": f"overhead_ws{world_size}", "steps": steps, "output_dir": str(out)},
           "models": {"student": str(student), "teacher": str(teacher)},
           "learner": {"world_size": world_size, "lr": lr},
           "rollout": {"batch_prompts": batch, "max_new_tokens": max_new},
           "loss": {"type": loss},
           "eval": {"every": 10**6, "num_examples": 8}, "checkpoint": {"every": 0},
           "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "overhead"}}
    if pipeline_max_staleness:
        raw["pipeline"] = {"max_staleness": pipeline_max_staleness}
    client, run_id = run_trainer(raw)
    result = {}
    # the last step also evaluates (and then the final checkpoint is saved): exclude it like the warm-up
    phases = ("step", "rollout", "teacher", "learner", "sync", "rollout_busy", "teacher_busy", "learner_busy", "critical_path")
    for key, metric in [(k, f"timing/{k}") for k in phases] + [(m, m) for m in extra_metrics]:
        vals = [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]
        result[key] = statistics.median(vals[3:-1] if len(vals) > 4 else vals[3:])
    return result


def run_trainer(raw: dict):
    """Validate a config dict, run it through OPDTrainer on local Ray, and return (MLflow client,
    run id)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import connect_ray
    from core.config import validate
    from orchestrator.plan import resolve
    from orchestrator.trainer import OPDTrainer

    cfg = validate(raw)
    plan = resolve(cfg)
    connect_ray(plan.available_cpus)
    trainer = OPDTrainer(cfg, plan, resume=False, show_progress=False)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    return MlflowClient(plan.tracking_uri), trainer.state.mlflow_run_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_overhead.json"))
    args = parser.parse_args()
    lr, max_new = 1e-5, 6
    rows = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for size in args.sizes.split(","):
            student, teacher = build_models(size, tmp)
            params = sum(p.numel() for p in load_model(student).parameters())
            ref = single_process(student, teacher, args.steps, args.batch, max_new, lr)
            ours = project(student, teacher, args.steps, args.batch, max_new, lr, tmp / f"run_{size}", args.world_size)
            piped = project(student, teacher, args.steps, args.batch, max_new, lr, tmp / f"run_{size}_piped",
                            args.world_size, pipeline_max_staleness=1)
            rows[size] = {"params": params, "single_process_step_s": ref["step"], "project_step_s": ours["step"],
                          "project_phases_s": ours, "ratio": ours["step"] / ref["step"],
                          # wall time the actors' busy time does not explain: dispatch, object store, waits
                          "project_fixed_overhead_s": ours["step"] - ours["critical_path"],
                          "pipelined_step_s": piped["step"], "pipelined_phases_s": piped,
                          "pipelined_ratio": piped["step"] / ref["step"]}
            print(f"{size}: {params} params, single-process {ref['step'] * 1e3:.1f} ms/step, "
                  f"project {ours['step'] * 1e3:.1f} ms/step (critical path {ours['critical_path'] * 1e3:.1f}), "
                  f"ratio {rows[size]['ratio']:.2f}; pipelined (staleness 1) {piped['step'] * 1e3:.1f} ms/step, "
                  f"ratio {rows[size]['pipelined_ratio']:.2f}", flush=True)
    main_size = "medium" if "medium" in rows else next(iter(rows))
    result = {
        "benchmark": "step_overhead",
        "ratio": rows[main_size]["ratio"],
        "ratio_model_size": main_size,
        "target": "<= 1.5",
        "sizes": rows,
        "settings": {"steps": args.steps, "batch_prompts": args.batch, "max_new_tokens": max_new, "lr": lr,
                     "world_size": args.world_size, "loss": "pg_reverse_kl", "warmup_steps_dropped": 3},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log_benchmark(result, "step_overhead")
    print(f"ratio {result['ratio']:.2f} at {main_size}; wrote {args.out}")
    return 0


def save_result(result: dict, out: str | Path, name: str) -> None:
    """Write the result JSON (committed under benchmarks/results/) and log it to MLflow."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    log_benchmark(result, name)


def log_benchmark(result: dict, name: str) -> None:
    """Log a benchmark result to MLflow (experiment `benchmarks`, default local store)."""
    from core.config import flatten
    from orchestrator.tracking import MlflowLogger, resolve_uri

    tracker = MlflowLogger(resolve_uri(None, ROOT / "runs"), "benchmarks", name, artifact_root=ROOT / "runs" / "mlartifacts")
    flat = flatten(result)
    tracker.log(0, {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.log_json(result, f"{name}.json")
    tracker.close()


if __name__ == "__main__":
    raise SystemExit(main())
