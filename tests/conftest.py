"""Shared fixtures: the embedded models (built once by the real `foresight prepare` command)
and CLI helpers. End-to-end tests are marked `e2e`; `make test-unit` skips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore", "FORESIGHT_LOG_LEVEL": "INFO",
}
os.environ.update(TEST_ENV)
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


def foresight(*args: str, cwd: Path = ROOT, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m orchestrator ...`) in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **TEST_ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"foresight {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def models() -> Path:
    """The shipped teacher + student (models/addition, built by `foresight prepare`); the command
    checks them against their record (recipe, sha256) and rebuilds them only if they differ."""
    out = ROOT / "models" / "addition"
    foresight("prepare", "--out", str(out), timeout=1200)
    return out


@pytest.fixture(scope="session")
def twin_models() -> Path:
    """The shipped math twin (models/math_twin: verl data, BPE tokenizer + chat template, Qwen2
    teacher and student), verified by `foresight prepare --workload math_twin`."""
    out = ROOT / "models" / "math_twin"
    foresight("prepare", "--workload", "math_twin", timeout=1800)
    return out


SMOKE_PIPELINED = ("pipeline.max_staleness=1",)


@pytest.fixture(scope="session")
def smoke_reference(models, tmp_path_factory) -> dict:
    """experiments/smoke.yaml run once through the CLI (vanilla OPD, 80 steps, pipelined with
    `pipeline.max_staleness=1`; every other end-to-end run is strictly on-policy)."""
    import time

    from mlflow.tracking import MlflowClient

    out = tmp_path_factory.mktemp("smoke_reference")
    t0 = time.time()
    proc = foresight("run", str(ROOT / "experiments" / "smoke.yaml"), *run_overrides(models, out), *SMOKE_PIPELINED)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "smoke"]
    return {"out": out, "client": client, "run": runs[0], "runs": runs, "seconds": time.time() - t0, "proc": proc}


METHOD_SWEEP = """\
sweep: dash
base:
  run: {steps: 60, seed: 0}
  learner: {lr: 1.0e-4, world_size: 1}
  loss: {type: pg_reverse_kl}
  rollout: {batch_prompts: 64, max_new_tokens: 6}
  eval: {every: 20, num_examples: 200}
  geometry: {every: 20}
  checkpoint: {every: 0}
  teacher: {shared: true}
matrix:
  method.type: [vanilla]
  run.seed: [0, 1]
include:
  - {name: effopd_s0, method.type: effopd, method.evaluators: borrowed, run.seed: 0}
  - {name: effopd_s1, method.type: effopd, method.evaluators: borrowed, run.seed: 1}
  - {name: exopd_lam125, method.type: exopd, method.lam: 1.25, run.seed: 0}
"""
"""The papers' loss (sampled-token reverse-KL policy gradient) with vanilla OPD and EffOPD x seeds 0, 1,
and ExOPD at lam 1.25, 60 steps each (ExOPD at lam 1 runs vanilla's step exactly: test_losses.py and
test_config.py check that). One learner rank, and EffOPD candidates scored by the
rollout engine (method.evaluators: borrowed): 0.75 CPU per trial, two trials at once on 2 CPUs. The
trials score on one shared teacher pool (`teacher.shared`; ExOPD's reference is scored in the same
HF actor)."""


@pytest.fixture(scope="session")
def method_sweep(models, tmp_path_factory) -> dict:
    """METHOD_SWEEP run once through `foresight run` (checked by test_e2e_opd and rendered by
    test_e2e_dashboard)."""
    import time

    out = tmp_path_factory.mktemp("dash")
    (out / "dash.yaml").write_text(METHOD_SWEEP)
    t0 = time.time()
    run = foresight("run", str(out / "dash.yaml"), *run_overrides(models, out))
    return {"out": out, "run": run, "seconds": time.time() - t0}


@pytest.fixture(scope="session")
def fake_models(tmp_path_factory) -> Path:
    """Folders that pass the path checks (a config.json and one tokenizer), for validation tests that
    never load weights."""
    from core.modeling import build_tokenizer

    root = tmp_path_factory.mktemp("fake_models")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # chat-prompt data files render
    for role in ("student", "teacher"):
        (root / role).mkdir()
        tokenizer.save_pretrained(root / role)
        (root / role / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                             "num_attention_heads": 2}))
    return root


def model_overrides(models: Path) -> list[str]:
    return [f"models.student={models / 'student'}", f"models.teacher={models / 'teacher'}"]


def run_overrides(models: Path, out: Path) -> list[str]:
    """Point a run at the test models, a temp output dir and a temp MLflow store."""
    return model_overrides(models) + [f"run.output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
