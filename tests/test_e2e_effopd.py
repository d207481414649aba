"""EffOPD on real components: the partition-local jump on ZeRO-3 ranks, the parallel evaluator
pool, a no-accept run vs vanilla, and kill/resume across a search boundary."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.evaluator import CandidateEvaluator
from actors.group import ActorGroup, free_port, split
from actors.learner import Learner
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from actors.weights import WeightsHandle, fetch_state_dict
from conftest import ROOT, foresight, model_overrides, run_overrides
from orchestrator.config import load_config
from orchestrator.extrapolation import accept, coefficient, extrapolate
from orchestrator.trainer import actor_config, batch_indices
from test_e2e_opd import SMOKE, assert_same_metrics, history, latest, mlflow_run, start_run, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    """A local Ray cluster in this process, two ZeRO-3 learner ranks after one OPD step."""
    cfg = load_config(SMOKE, model_overrides(models) + [f"run.output_dir={tmp_path_factory.mktemp('fx')}"])
    acfg = actor_config(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    port = free_port()
    learners = ActorGroup(Learner, 2, lambda r: (r, 2, port, acfg), {"num_cpus": 0.5})
    ray.get(learners.call("setup"))
    ray.get(learners.call("set_anchor"))
    batch = RolloutWorker(acfg).generate(1, batch_indices(1, 20000, 64, 0), None)
    scores = TeacherScorer(acfg).score(batch, full=True)
    ray.get(learners.call("train_step", [ray.put(batch)], [ray.put(scores)], 1.0))
    yield {"cfg": cfg, "acfg": acfg, "learners": learners}
    ray.get(learners.call("shutdown"))
    ray.shutdown()


def publish(learners, which="current", version=1) -> WeightsHandle:
    return WeightsHandle(version, ray.get(learners.call("publish_weights", 64.0, which))[0])


def test_jump_is_exact_on_every_rank_without_gather(cluster, models):
    learners = cluster["learners"]
    before = ray.get(learners.call("partition_state"))
    w_full = fetch_state_dict(publish(learners))
    a_full = fetch_state_dict(publish(learners, "anchor", 2))
    w0 = load_file(str(models / "student" / "model.safetensors"))
    assert all(torch.equal(a_full[k], w0[k]) for k in w0)  # the anchor is W_0 before the first search
    assert any(not torch.equal(w_full[k], w0[k]) for k in w0)  # and the step moved the weights
    coef = coefficient(2)
    ray.get(learners.call("extrapolate", coef))
    after = ray.get(learners.call("partition_state"))
    for rank in range(2):
        for m0, a, m1, w1 in zip(before[rank]["master"], before[rank]["anchor"], after[rank]["master"], after[rank]["working"]):
            assert torch.equal(m1, extrapolate(m0, a, coef))  # fp32 master == W + 2k*Delta exactly
            assert torch.equal(w1, m1)                        # working partition follows
            assert a.numel() == m0.numel()                    # anchor is partition-sized (1/W of the model)
    jumped = fetch_state_dict(publish(learners, version=3))
    for k in w_full:  # what the evaluators scored is bit-identical to where the learner jumped
        assert torch.equal(jumped[k], extrapolate(w_full[k], a_full[k], coef)), k
    total = sum(p.numel() for p in w0.values())
    assert sum(a.numel() for a in before[0]["anchor"]) < 0.6 * total


def test_parallel_pool_gives_the_sequential_decisions(cluster):
    learners, acfg = cluster["learners"], cluster["acfg"]
    current, anchor = publish(learners, version=10), publish(learners, "anchor", 11)
    coefs = [0.0] + [coefficient(k) for k in range(1, 6)]
    pool = ActorGroup(CandidateEvaluator, 2, lambda i: (acfg,), {"num_cpus": 0.25})
    parts = split(list(range(len(coefs))), 2)
    parallel = [s for r in ray.get(pool.call_each("score", [(current, anchor, [coefs[i] for i in p]) for p in parts])) for s in r]
    single = CandidateEvaluator(acfg)  # sequential: one evaluator, one candidate at a time, in order
    sequential = [single.score(current, anchor, [c])[0] for c in coefs]
    pool.kill()
    assert parallel == sequential
    for comparison in (">=", ">"):
        assert accept(parallel[0], parallel[1:], comparison) == accept(sequential[0], sequential[1:], comparison)


@pytest.fixture(scope="module")
def vanilla_final(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("vanilla")
    foresight("run", SMOKE, *run_overrides(models, out))
    return load_file(str(out / "smoke" / "final" / "model.safetensors"))


def test_effopd_with_no_accepted_jump_is_bit_identical_to_vanilla(models, tmp_path, vanilla_final):
    foresight("run", SMOKE, *run_overrides(models, tmp_path), "method.type=effopd")
    client, runs = mlflow_run(tmp_path)
    accepted = history(client, runs[0].info.run_id, "effopd/accepted_k")
    assert [s for s, _ in accepted] == [1, 2, 4, 8, 16, 32, 64]
    assert all(k == 0 for _, k in accepted), f"a jump was accepted: {accepted}"  # the premise at this lr
    eff = load_file(str(tmp_path / "smoke" / "final" / "model.safetensors"))
    assert all(torch.equal(eff[k], vanilla_final[k]) for k in vanilla_final)
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert "effopd_decisions.json" in arts


EFF = ["method.type=effopd", "learner.lr=3e-5", "checkpoint.every=16"]


def test_kill_and_resume_across_search_boundary_reproduces_decisions(models, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    foresight("run", SMOKE, *run_overrides(models, ref_out), *EFF)
    ref_client, ref_runs = mlflow_run(ref_out)
    ref_id = ref_runs[0].info.run_id
    accepted = history(ref_client, ref_id, "effopd/accepted_k")
    assert any(k > 0 for _, k in accepted), "no jump accepted: the test would not exercise the anchor"

    proc = start_run(models, out, *EFF)
    wait_for(lambda: latest(out) == "step0000048", proc)  # after the search at 32, before the one at 64
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    foresight("run", SMOKE, *run_overrides(models, out), *EFF)
    client, runs = mlflow_run(out)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for key in ["effopd/accepted_k", "effopd/base_score"] + [f"effopd/score_k{k}" for k in range(1, 6)]:
        assert history(client, run_id, key) == history(ref_client, ref_id, key), key
    assert_same_metrics(client, run_id, {"client": ref_client, "run": ref_runs[0]})


def test_teacher_kl_validation_score(cluster):
    """V = -mean reverse KL on the candidate's own D_v samples, recomputed independently here."""
    from orchestrator.modeling import gather_logp, generate, load_model, load_tokenizer, response_logits

    learners, acfg = cluster["learners"], {**cluster["acfg"], "val_score": "teacher_kl"}
    current, anchor = publish(learners, version=20), publish(learners, "anchor", 21)
    got = CandidateEvaluator(acfg).score(current, anchor, [0.0, 2.0])
    student, teacher = load_model(acfg["student_path"]), load_model(acfg["teacher_path"])
    tok = load_tokenizer(acfg["student_path"])
    w = fetch_state_dict(current)
    student.load_state_dict(w, strict=False)
    val = __import__("orchestrator.task", fromlist=["build_task"]).build_task(acfg["task_cfg"]).validation_set(50, acfg["seed"])
    out = generate(student, tok, [e.prompt for e in val], 6, greedy=False, seed=acfg["seed"] + 12345)
    with torch.no_grad():
        s = gather_logp(torch.log_softmax(response_logits(student, out["input_ids"], out["attention_mask"], out["prompt_len"]), -1), out["response"])
        q = gather_logp(torch.log_softmax(response_logits(teacher, out["input_ids"], out["attention_mask"], out["prompt_len"]), -1), out["response"])
    m = out["response_mask"]
    assert got[0] == pytest.approx(-float(((s - q) * m).sum() / m.sum()), abs=1e-5)
    assert got[0] < 0 and got[1] != got[0]
