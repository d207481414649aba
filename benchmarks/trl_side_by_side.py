"""Side by side: Foresight's OPD step vs TRL's single-process `DistillationTrainer` (TRL 1.16,
on-policy distillation with reverse KL), on the same models, prompts, batch and cores.

    python benchmarks/trl_side_by_side.py [--steps 40] [--sizes tiny,medium]

Same work per optimizer step on both sides: 64 prompts of the embedded addition task (`ABC+DEF=`,
the same prompts at each step: Foresight's seeded `batch_indices`), one completion each sampled by
the student at temperature 1.0 (no top-k / top-p), at most 6 new tokens, the teacher's full
next-token distribution on them, the full-vocabulary reverse KL KL(pi_s || pi_t) over the response
tokens (TRL: `beta=1.0`, its generalized-JSD loss at the reverse-KL end; Foresight:
`loss.type: full_reverse_kl`), gradient clip 1.0 and one AdamW step at a constant lr 1e-5, fp32.
TRL samples every step from the current student (its `DistillationTrainer` is always on-policy;
1.16 has no `lmbda`) in one process: no evaluation, no checkpoints, `report_to none`, no logging
steps, no gradient checkpointing, no bf16 (its defaults, meant for GPUs), dataloader without
workers. Foresight runs the real pipeline (Ray actors, ZeRO-3 learner, weight sync) through
`OPDTrainer`, as `benchmarks/step_overhead.py` does.

Models: `tiny` = the shipped `models/addition/{student,teacher}`; `medium` = the random-init
4-layer d=256 Llama pair of step_overhead.py (`build_models`). Each side runs at each of its thread
settings and is reported at its best: TRL with 1 and 2 torch threads (OMP_NUM_THREADS and
`torch.set_num_threads`); Foresight (one thread per actor) at learner world size 1 and 2, each with
`pipeline.max_staleness` 0 (strictly on-policy) and 1 (the next batch is sampled while the learner
trains). Step time = median over the steps after 3 warm-up steps: TRL's from a TrainerCallback
(`on_step_begin` -> `on_step_end`: generation, teacher, loss, backward, clip, AdamW), Foresight's
its `timing/step` (the last step, which also evaluates, is dropped too).
ratio = Foresight best / TRL best, per size; targets <= 1.0 at medium, <= 1.5 at tiny. The settings run
one after the other (TRL's first, then Foresight's, per size); the 1-minute load average after each
is recorded, since anything else running on the cores shows up in every number (a 2-thread TRL run
on two cores that other jobs also use is many times slower than its 1-thread run).

TRL lives in its own virtual environment (`.cache/trl-venv`, created on first use with
`pip install torch==2.13.0 trl==1.16.0 transformers==<this venv's>`; a CUDA torch is refused) and
runs as a subprocess of this script (`--worker`). Writes benchmarks/results/trl_side_by_side.json
(machine, settings, models' sha256, TRL's version and config arguments, every setting's median,
the best of each side, the ratios) and logs it to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import hashlib
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
TRL_VERSION = "1.16.0"
TORCH_PIN = "torch==2.13.0"
TRL_VENV = ROOT / ".cache" / "trl-venv"
WARMUP = 3
TARGETS = {"medium": 1.0, "tiny": 1.5}
TRL_THREADS = (1, 2)
FORESIGHT_SETTINGS = ((1, 0), (1, 1), (2, 0), (2, 1))
"""(learner.world_size, pipeline.max_staleness)."""
FORESIGHT_LOSS = "full_reverse_kl"
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_TELEMETRY": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}


# ----------------------------------------------------------------------------- TRL side (worker)
def trl_args(spec: dict) -> dict:
    """The `DistillationConfig` arguments (TRL 1.16 names) for the same work as Foresight's step."""
    return {
        "output_dir": spec["output_dir"],
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "max_grad_norm": 1.0,
        "beta": 1.0,  # generalized JSD interpolation: 1.0 = reverse KL KL(student || teacher)
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_completion_length": spec["max_new"],
        "shuffle_dataset": False,  # the dataset already lists each step's prompts in order
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "log_completions": False,
        "seed": 0,
    }


def trl_worker(spec_path: str) -> int:
    """Runs in the TRL venv: one `DistillationTrainer.train()` of spec['steps'] steps, timed per step."""
    spec = json.loads(Path(spec_path).read_text())
    threads = int(spec["threads"])
    import torch

    torch.set_num_threads(threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    transformers.logging.set_verbosity_error()

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (begin -> end) and between consecutive step ends."""

        def __init__(self) -> None:
            self.begin, self.steps, self.intervals, self.last_end = 0.0, [], [], None
            self.trainer = None
            self.completion_len: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append(now - self.begin)
            if self.last_end is not None:
                self.intervals.append(now - self.last_end)
            self.last_end = now
            lengths = self.trainer._metrics["train"].get("completions/mean_length") if self.trainer else None
            if lengths:
                self.completion_len.append(float(lengths[-1]))

    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    args = trl_args(spec)
    config = DistillationConfig(**args)
    timer = StepTimer()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
                                  processing_class=tok, callbacks=[timer])
    timer.trainer = trainer
    trainer.train()
    kept = timer.steps[WARMUP:]
    result = {
        "threads": threads, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "config_args": args,
        "resolved": {k: str(getattr(config, k)) for k in ("optim", "bf16", "gradient_checkpointing", "lr_scheduler_type",
                                                           "beta", "temperature", "top_k", "top_p", "use_cpu")},
        "step_times_s": timer.steps, "step_intervals_s": timer.intervals,
        "completion_mean_length": timer.completion_len,
        "step_s": statistics.median(kept),
        "step_interval_s": statistics.median(timer.intervals[WARMUP:]) if len(timer.intervals) > WARMUP else None,
        "response_tokens": statistics.median(timer.completion_len[WARMUP:]) * spec["batch"]
        if len(timer.completion_len) > WARMUP else None,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    print(f"trl worker: {threads} thread(s), median {result['step_s'] * 1e3:.1f} ms/step", flush=True)
    return 0


# ----------------------------------------------------------------------------- TRL venv
def trl_python(venv: Path, transformers_version: str) -> Path:
    """The TRL venv's python: reused when it imports trl 1.16 with a CPU torch, else (re)built."""
    py = venv / "bin" / "python"
    check = (f"import torch, trl, transformers; assert trl.__version__ == {TRL_VERSION!r}; "
             "assert torch.version.cuda is None, 'CUDA torch'")
    if py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0:
        return py
    print(f"building the TRL venv {venv} (torch CPU build, trl {TRL_VERSION}, transformers {transformers_version})",
          flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = venv / "pip.log"
    cmd = [str(py), "-m", "pip", "install", TORCH_PIN, f"trl=={TRL_VERSION}", f"transformers=={transformers_version}"]
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    cuda = [line for line in text.splitlines() if any(s in line.lower() for s in ("nvidia-", "+cu1", "+cu2", "triton"))
            and ("collecting" in line.lower() or "downloading" in line.lower() or "processing" in line.lower()
                 or "successfully installed" in line.lower())]
    if cuda:
        raise SystemExit(f"refusing the TRL venv: pip pulled CUDA packages ({cuda[0].strip()}); see {log}")
    if rc != 0:
        raise SystemExit(f"pip install into {venv} failed (exit {rc}); see {log}")
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the TRL venv does not work: {out.stderr.strip()[-500:]}")
    return py


def run_trl(py: Path, spec: dict, tmp: Path) -> dict:
    """One TRL setting in a subprocess (the venv's python, `threads` OMP/torch threads)."""
    tag = f"{spec['size']}_t{spec['threads']}"
    spec = {**spec, "output_dir": str(tmp / f"trl_{tag}"), "result": str(tmp / f"trl_{tag}.json")}
    spec_path = tmp / f"trl_{tag}_spec.json"
    spec_path.write_text(json.dumps(spec))
    n = str(spec["threads"])
    env = {**os.environ, **QUIET_ENV, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           "HF_HOME": str(tmp / "hf_home"), "ACCELERATE_USE_CPU": "true"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    log = tmp / f"trl_{tag}.log"
    with log.open("w") as fh:
        rc = subprocess.run([str(py), str(Path(__file__).resolve()), "--worker", str(spec_path)],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(tmp)).returncode
    if rc != 0:
        raise SystemExit(f"TRL worker failed ({tag}, exit {rc}):\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(Path(spec["result"]).read_text())


# ----------------------------------------------------------------------------- driver
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_prompts(steps: int, batch: int, seed: int = 0) -> list[str]:
    """The prompts of steps 1..steps in order, as Foresight's driver draws them (`batch_indices`)."""
    from core.config import AdditionTask
    from core.task import build_addition
    from core.data_order import batch_indices

    train = build_addition(AdditionTask()).train
    return [train[i].prompt for step in range(1, steps + 1) for i in batch_indices(step, len(train), batch, seed)]


def best(rows: dict[str, dict]) -> dict:
    name = min(rows, key=lambda k: rows[k]["step_s"])
    return {"setting": name, "step_s": rows[name]["step_s"]}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return trl_worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--trl-venv", default=str(TRL_VENV))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl_side_by_side.json"))
    args = parser.parse_args()
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be > {WARMUP + 1} (the first {WARMUP} steps and the last one are not timed)")
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := [s for s in sizes if s not in TARGETS]:
        parser.error(f"unknown size(s) {unknown} (known: {', '.join(TARGETS)})")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    for key, value in {**QUIET_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                       "DS_BUILD_OPS": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    import torch
    import transformers

    from core.modeling import load_model
    from step_overhead import build_models, project, save_result

    lr, max_new = 1e-5, 6
    t_start, load_start = time.perf_counter(), list(os.getloadavg())
    py = trl_python(Path(args.trl_venv), transformers.__version__)
    prompts = step_prompts(args.steps, args.batch)
    rows: dict[str, dict] = {}
    trl_info: dict = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for size in sizes:
            student, teacher = build_models(size, tmp)
            models = {role: {"path": str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else f"random init ({size})",
                             "sha256": sha256(p / "model.safetensors"),
                             "params": sum(x.numel() for x in load_model(p).parameters())}
                      for role, p in (("student", student), ("teacher", teacher))}
            print(f"{size}: student {models['student']['params']} params, teacher {models['teacher']['params']}",
                  flush=True)
            trl_rows = {}
            for threads in TRL_THREADS:
                t0 = time.perf_counter()
                res = run_trl(py, {"size": size, "threads": threads, "student": str(student), "teacher": str(teacher),
                                   "prompts": prompts, "steps": args.steps, "batch": args.batch, "max_new": max_new,
                                   "lr": lr}, tmp)
                trl_info = {k: res[k] for k in ("trl", "transformers", "torch", "torch_cuda", "resolved")}
                trl_info["config_args"] = {k: v for k, v in res["config_args"].items() if k != "output_dir"}
                trl_rows[f"threads_{threads}"] = {**{k: res[k] for k in ("step_s", "step_interval_s", "response_tokens",
                                                                         "torch_threads", "step_times_s")},
                                                  "load_avg_1m_after": os.getloadavg()[0]}
                print(f"  TRL       {threads} thread(s):            {res['step_s'] * 1e3:8.1f} ms/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            ours_rows = {}
            for ws, stale in FORESIGHT_SETTINGS:
                t0 = time.perf_counter()
                name = f"ws{ws}_staleness{stale}"
                res = project(student, teacher, args.steps, args.batch, max_new, lr, tmp / f"run_{size}_{name}", ws,
                              pipeline_max_staleness=stale, loss=FORESIGHT_LOSS,
                              extra_metrics=("train/response_tokens",))
                ours_rows[name] = {"step_s": res.pop("step"), "response_tokens": res.pop("train/response_tokens"),
                                   "phases_s": res, "load_avg_1m_after": os.getloadavg()[0]}
                print(f"  Foresight world size {ws}, staleness {stale}: {ours_rows[name]['step_s'] * 1e3:8.1f} ms/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            import ray

            ray.shutdown()  # idle Ray services would otherwise share the cores with the next size's TRL runs
            tb, fb = best(trl_rows), best(ours_rows)
            ratio = fb["step_s"] / tb["step_s"]
            rows[size] = {"models": models, "trl": trl_rows, "foresight": ours_rows, "trl_best": tb,
                          "foresight_best": fb, "ratio": ratio, "target": f"<= {TARGETS[size]}",
                          "meets_target": ratio <= TARGETS[size]}
            print(f"{size}: TRL best {tb['step_s'] * 1e3:.1f} ms/step ({tb['setting']}), Foresight best "
                  f"{fb['step_s'] * 1e3:.1f} ms/step ({fb['setting']}), ratio {ratio:.2f} "
                  f"(target <= {TARGETS[size]})", flush=True)
    result = {
        "benchmark": "trl_side_by_side",
        "ratios": {s: r["ratio"] for s, r in rows.items()},
        "targets": {s: f"<= {TARGETS[s]}" for s in rows},
        "sizes": rows,
        "trl": {"trainer": "trl.DistillationTrainer", **trl_info,
                "on_policy": "always (TRL 1.16's DistillationTrainer has no lmbda: the student samples every batch)",
                "loss": "generalized JSD at beta=1.0 = full-vocabulary reverse KL, sum over response tokens / their count",
                "timing": "TrainerCallback on_step_begin -> on_step_end (step_interval_s: on_step_end to on_step_end)"},
        "foresight": {"loss": FORESIGHT_LOSS, "settings": [f"ws{w}_staleness{s}" for w, s in FORESIGHT_SETTINGS],
                      "actor_threads": 1, "timing": "MLflow timing/step (driver wall time of step_once)"},
        "settings": {"steps": args.steps, "batch_prompts": args.batch, "samples_per_prompt": 1,
                     "max_new_tokens": max_new, "temperature": 1.0, "lr": lr, "optimizer": "AdamW, constant lr",
                     "grad_clip": 1.0, "warmup_steps_dropped": WARMUP, "foresight_last_step_dropped": True,
                     "prompts": "embedded addition task, Foresight's batch_indices(step, seed 0), same on both sides",
                     "trl_threads": list(TRL_THREADS)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_avg_at_start": load_start, "load_avg_at_end": list(os.getloadavg())},
        "duration_s": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_result(result, args.out, "trl_side_by_side")
    print("; ".join(f"{s}: ratio {r['ratio']:.2f} (target <= {TARGETS[s]})" for s, r in rows.items())
          + f"; wrote {args.out} ({result['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
