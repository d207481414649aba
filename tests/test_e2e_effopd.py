"""EffOPD on real components: the partition-local jump on ZeRO-3 ranks, the parallel evaluator
pool, a no-accept run vs vanilla; and the crash test of the project: an EffOPD run whose rollout,
teacher and evaluator actors are SIGKILLed (Ray restarts them) and whose driver is then SIGKILLed
between two searches, resumed, and compared with an uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.evaluator import CandidateEvaluator
from actors.group import ActorGroup, split
from actors.learner import Learner
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from actors.weights import WeightsHandle, fetch_state_dict
from conftest import foresight, model_overrides, run_overrides
from e2e_helpers import SMOKE, assert_same_metrics, history, latest, mlflow_run, reached, start_run, wait_for
from orchestrator.cli import start_local_ray
from core.config import load_config
from core.extrapolation import accept, coefficient, extrapolate
from orchestrator.placement import start_learners
from orchestrator.actor_spec import actor_config
from core.data_order import batch_indices

pytestmark = pytest.mark.e2e
SPEC = {"kind": "full_reverse_kl", "lam": 1.0, "rlvr_mix": 1.0, "importance_correction": True,
        "importance_threshold": 5.0}


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    """A local Ray cluster in this process, two ZeRO-3 learner ranks after one OPD step."""
    cfg = load_config(SMOKE, model_overrides(models) + [f"run.output_dir={tmp_path_factory.mktemp('fx')}"])
    acfg = actor_config(cfg)
    start_local_ray(num_cpus=2, logging_level="ERROR")
    learners = ActorGroup(Learner, 2, lambda r: (r, 2, acfg), {"num_cpus": 0.5})
    start_learners(learners)
    ray.get(learners.call("set_anchor"))
    opd_step(learners, acfg, 1)
    yield {"cfg": cfg, "acfg": acfg, "learners": learners}
    ray.get(learners.call("shutdown"))
    ray.shutdown()


def opd_step(learners, acfg: dict, step: int) -> None:
    """One OPD step on the learner ranks (their weights move away from the anchor)."""
    batch = RolloutWorker(acfg).generate(step, batch_indices(step, 20000, 64, 0), None)
    scores = TeacherScorer(acfg).score(batch, full=True)
    ray.get(learners.call("train_step", [[ray.put(batch), ray.put(scores), 64]], SPEC, step))


def publish(learners, which="current", version=1, coef=0.0) -> WeightsHandle:
    return WeightsHandle(version, ray.get(learners.call("publish_weights", 64.0, which, coef))[0])


def candidates(learners, coefs: list[float]) -> list[WeightsHandle]:
    """The handles the trainer gives the pool: W_t for c = 0, else the learner-formed candidate."""
    return [publish(learners, version=-1) if c == 0 else publish(learners, "candidate", -1, c) for c in coefs]


def test_jump_is_exact_on_every_rank_without_gather(cluster, models):
    learners = cluster["learners"]
    before = ray.get(learners.call("partition_state"))
    w_full = fetch_state_dict(publish(learners))
    a_full = fetch_state_dict(publish(learners, "anchor", 2))
    w0 = load_file(str(models / "student" / "model.safetensors"))
    assert all(torch.equal(a_full[k], w0[k]) for k in w0)  # the anchor is W_0 before the first search
    assert any(not torch.equal(w_full[k], w0[k]) for k in w0)  # and the step moved the weights
    coef = coefficient(2)
    scored = fetch_state_dict(publish(learners, "candidate", 2, coef))  # what an evaluator gets to score
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
        assert torch.equal(jumped[k], scored[k]), k
    total = sum(p.numel() for p in w0.values())
    assert sum(a.numel() for a in before[0]["anchor"]) < 0.6 * total


def record_nccl(learners, group: str) -> None:
    """Rank 0's sender for `group` records what it would broadcast (CPU stand-in for vLLM's NCCL
    producer; the producer itself is checked against vLLM in tests/test_vllm_nccl_api.py)."""
    class Recording:
        def __init__(self) -> None:
            self.sent: list[dict[str, torch.Tensor]] = []

        def send(self, named) -> None:
            self.sent.append({name: t.clone() for name, t in named})

        def close(self) -> None:
            pass

    ray.get(learners.actors[0].__ray_call__.remote(lambda self: self.senders.__setitem__(group, Recording())))


def nccl_sent(learners, group: str) -> list[dict[str, torch.Tensor]]:
    return ray.get(learners.actors[0].__ray_call__.remote(lambda self: self.senders[group].sent))


def test_nccl_send_of_a_candidate_is_what_the_object_store_path_publishes(cluster):
    """GPU path with the NCCL transport recorded: a candidate sent on the evaluator group is the
    published candidate bit for bit, in the order, dtypes and shapes of the group's metadata, and
    the ranks hold W_t again afterwards."""
    learners = cluster["learners"]
    record_nccl(learners, "evaluator")
    current = fetch_state_dict(publish(learners, version=40))
    coef = coefficient(3)
    ray.get(learners.call("nccl_send", "evaluator", "candidate", coef))
    ray.get(learners.call("nccl_send", "evaluator", "current"))
    [candidate, again] = nccl_sent(learners, "evaluator")
    meta = ray.get(learners.actors[0].nccl_meta.remote())
    assert [(k, str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in candidate.items()] == meta
    published = fetch_state_dict(publish(learners, "candidate", 41, coef))
    assert published.keys() == candidate.keys() and all(torch.equal(candidate[k], published[k]) for k in published)
    assert any(not torch.equal(candidate[k], current[k]) for k in current)
    assert all(torch.equal(again[k], current[k]) for k in current)
    assert all(torch.equal(v, current[k]) for k, v in fetch_state_dict(publish(learners, version=42)).items())


def test_nccl_sync_scores_by_sharing_d_v_across_the_pool(cluster):
    """The NCCL transport's scoring (GPU, vLLM pool), transport recorded and engines faked (no CUDA, no
    vLLM here): one broadcast per candidate, in order; every engine gets a disjoint share of D_v and
    V = (sum of the shares' rewards) / |D_v|."""
    from types import SimpleNamespace

    from orchestrator.weight_sync import NcclSync

    class Engine:
        """Greedy reward of D_v example i under candidate j (the j-th receive) is ((i + j) % 3 == 0)."""
        def __init__(self) -> None:
            self.received = 0

        def score_received(self, meta, share):
            assert meta, "no metadata"
            self.received += 1
            return float(sum((i + self.received - 1) % 3 == 0 for i in share)), len(share)

    learners = cluster["learners"]
    record_nccl(learners, "evaluator")
    evaluators = ActorGroup(Engine, 3, lambda i: (), {"num_cpus": 0.1})
    cfg = SimpleNamespace(method=SimpleNamespace(type="effopd", val_size=10), learner=SimpleNamespace(sync_bucket_mb=64.0))
    plan = SimpleNamespace(role=lambda name: SimpleNamespace(backend="vllm"))
    sync = NcclSync(cfg, plan, SimpleNamespace(learner=learners, evaluators=evaluators, rollout=None))
    sync.meta = ray.get(learners.actors[0].nccl_meta.remote())
    coefs = [0.0, coefficient(1), coefficient(2)]
    try:
        scores = sync.score(coefs)
    finally:
        evaluators.kill()
    n = cfg.method.val_size
    assert scores == [sum((i + j) % 3 == 0 for i in range(n)) / n for j in range(len(coefs))]
    sent = nccl_sent(learners, "evaluator")
    assert len(sent) == 3
    published = [fetch_state_dict(publish(learners, "current" if c == 0 else "candidate", 50 + j, c)) for j, c in enumerate(coefs)]
    assert all(torch.equal(s[k], p[k]) for s, p in zip(sent, published) for k in p)


def test_attn_mlp_moves_only_the_authors_parameters_in_candidate_and_jump_alike(cluster):
    """`method.params: attn_mlp`: the candidate published for scoring moves exactly the tensors the
    authors' name rule selects (the others are W_t bit for bit), and the jump lands on that point."""
    from core.extrapolation import extrapolated

    learners = cluster["learners"]
    w, a = fetch_state_dict(publish(learners, version=60)), fetch_state_dict(publish(learners, "anchor", 61))
    coef = coefficient(2)
    scored = fetch_state_dict(WeightsHandle(-1, ray.get(learners.call("publish_weights", 64.0, "candidate", coef,
                                                                      "attn_mlp"))[0]))
    moved = {k for k in w if extrapolated(k, "attn_mlp")}
    assert moved and moved != set(w) and any(not torch.equal(w[k], a[k]) for k in moved)
    for k in w:
        assert torch.equal(scored[k], extrapolate(w[k], a[k], coef) if k in moved else w[k]), k
    ray.get(learners.call("extrapolate", coef, "attn_mlp"))
    jumped = fetch_state_dict(publish(learners, version=62))
    assert all(torch.equal(jumped[k], scored[k]) for k in w)
    ray.get(learners.call("set_anchor"))


def test_rank1_candidate_moves_each_matrix_along_its_deltas_leading_singular_direction(cluster):
    """`method.subspace: rank1` (params `all:rank1`): from the 2 ranks' partitions, each matrix of the
    published candidate is W + c s1 u1 v1^T of its Delta = W - anchor (the gathered tensors' SVD),
    other tensors W + c Delta; the jump lands on the candidate bit for bit."""
    learners = cluster["learners"]
    opd_step(learners, cluster["acfg"], 5)  # move away from the anchor
    w, a = fetch_state_dict(publish(learners, version=70)), fetch_state_dict(publish(learners, "anchor", 71))
    coef = coefficient(1)
    scored = fetch_state_dict(WeightsHandle(-1, ray.get(learners.call("publish_weights", 64.0, "candidate", coef,
                                                                      "all:rank1"))[0]))
    matrices = [k for k in w if w[k].dim() == 2 and not torch.equal(w[k], a[k])]
    assert matrices
    for k in w:
        delta = w[k].double() - a[k].double()
        if w[k].dim() != 2:
            assert torch.equal(scored[k], extrapolate(w[k], a[k], coef)), k
            continue
        U, S, Vh = torch.linalg.svd(delta)
        want = w[k].double() + coef * S[0] * torch.outer(U[:, 0], Vh[0])
        assert torch.allclose(scored[k].double(), want, atol=1e-5 * max(1.0, float(S[0]) * coef)), k
    ray.get(learners.call("extrapolate", coef, "all:rank1"))
    jumped = fetch_state_dict(publish(learners, version=72))
    assert all(torch.equal(jumped[k], scored[k]) for k in w)
    ray.get(learners.call("set_anchor"))


def test_direction_cosines_from_partitions_equal_the_full_tensors(cluster):
    """`direction_stats`: partition-local sums reduced across the 2 ranks give, per parameter group,
    the cosine and norm ratio of Delta_n = W - anchor against the last search's Delta_{n-1}, as the
    gathered full tensors do; the first search gives norms only."""
    from core.extrapolation import direction_group

    learners, acfg = cluster["learners"], cluster["acfg"]
    ray.get(learners.call("set_anchor"))
    opd_step(learners, acfg, 3)
    w0, a0 = fetch_state_dict(publish(learners, version=40)), fetch_state_dict(publish(learners, "anchor", 41))
    ranks = ray.get(learners.call("direction_stats"))
    first = ranks[0]
    assert ranks[0] == ranks[1] and "direction/norm/all" in first and not any(k.startswith("direction/cos") for k in first)
    prev = {k: (w0[k].double() - a0[k].double()) for k in w0}
    ray.get(learners.call("set_anchor"))  # a rejected search: W_t becomes the anchor, the loop goes on
    opd_step(learners, acfg, 4)
    w1, a1 = fetch_state_dict(publish(learners, version=42)), fetch_state_dict(publish(learners, "anchor", 43))
    got = ray.get(learners.call("direction_stats"))[0]
    new = {k: (w1[k].double() - a1[k].double()) for k in w1}
    for group in ("attention", "mlp", "all"):
        keys = [k for k in new if group == "all" or direction_group(k) == group]
        dot = sum(float((prev[k] * new[k]).sum()) for k in keys)
        pp, nn = (sum(float((d[k] ** 2).sum()) for k in keys) for d in (prev, new))
        assert got[f"direction/cos/{group}"] == pytest.approx(dot / (pp * nn) ** 0.5, rel=1e-6, abs=1e-9), group
        assert got[f"direction/norm_ratio/{group}"] == pytest.approx((nn / pp) ** 0.5, rel=1e-6), group
    assert -1.0 <= got["direction/cos/all"] <= 1.0
    ray.get(learners.call("set_anchor"))


def test_anchor_is_the_accepted_point_after_accepted_and_rejected_searches(cluster):
    """After a search the next direction starts from where the search left the weights: the jumped
    point when a candidate was accepted, W_t itself when none was."""
    learners = cluster["learners"]
    w, a = fetch_state_dict(publish(learners, version=30)), fetch_state_dict(publish(learners, "anchor", 31))
    coef = coefficient(1)
    ray.get(learners.call("extrapolate", coef))  # accepted k = 1
    ray.get(learners.call("set_anchor"))
    anchor = fetch_state_dict(publish(learners, "anchor", 32))
    assert all(torch.equal(anchor[k], extrapolate(w[k], a[k], coef)) for k in w)
    ray.get(learners.call("set_anchor"))  # rejected: W_t stays and becomes the anchor
    again = fetch_state_dict(publish(learners, "anchor", 33))
    current = fetch_state_dict(publish(learners, version=34))
    assert all(torch.equal(again[k], current[k]) and torch.equal(again[k], anchor[k]) for k in w)
    opd_step(learners, cluster["acfg"], 2)  # move on from the anchor again for the tests that follow


def test_parallel_pool_gives_the_sequential_decisions(cluster):
    """Scored by teacher KL (continuous, so distinct candidates get distinct scores)."""
    learners, acfg = cluster["learners"], {**cluster["acfg"], "val_score": "teacher_kl"}
    coefs = [0.0] + [coefficient(k) for k in range(1, 6)]
    handles = candidates(learners, coefs)
    pool = ActorGroup(CandidateEvaluator, 2, lambda i: (acfg,), {"num_cpus": 0.25})
    parts = split(list(range(len(coefs))), 2)
    parallel = [s for r in ray.get(pool.call_each("score", [([handles[i] for i in p],) for p in parts])) for s in r]
    single = CandidateEvaluator(acfg)  # sequential: one evaluator, one candidate at a time, in order
    sequential = [single.score([h])[0] for h in handles]
    pool.kill()
    assert parallel == sequential and len(set(sequential)) > 1  # distinct candidates, same scores
    for comparison in (">=", ">"):
        assert accept(parallel[0], parallel[1:], comparison) == accept(sequential[0], sequential[1:], comparison)


def test_effopd_with_no_accepted_jump_is_bit_identical_to_vanilla(method_sweep):
    """The session's method sweep: EffOPD (candidates scored by the rollout engine, one learner rank)
    accepted no jump in 60 steps at either seed, and its final weights are those of vanilla OPD bit for
    bit: the searches, the anchor and the borrowed engine's weight reloads leave training untouched."""
    out = method_sweep["out"]
    for seed in (0, 1):
        client, runs = mlflow_run(out, f"dash_effopd_s{seed}", experiment="dash")
        accepted = history(client, runs[0].info.run_id, "effopd/accepted_k")
        assert [s for s, _ in accepted] == [1, 2, 4, 8, 16, 32]
        assert all(k == 0 for _, k in accepted), f"a jump was accepted: {accepted}"  # the premise at this lr
        eff = load_file(str(out / f"dash_effopd_s{seed}" / "final" / "model.safetensors"))
        vanilla = load_file(str(out / f"dash_vanilla_s{seed}" / "final" / "model.safetensors"))
        assert all(torch.equal(eff[k], vanilla[k]) for k in vanilla)
        assert "effopd_decisions.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


EFF = ["method.type=effopd", "learner.lr=3e-5", "run.steps=32", "checkpoint.every=8", "geometry.every=0"]
"""Searches at steps 1, 2, 4, 8, 16, 32; checkpoints every 8 steps (measured: jumps accepted at 1 and 8)."""


def test_killed_actors_and_driver_resume_exactly_across_a_search(models, tmp_path):
    """The driver SIGKILLed before the first checkpoint (the rerun restarts from step 0 into the same
    MLflow run); then rollout, evaluator and teacher actors SIGKILLed mid-run (Ray restarts each and
    the step is retried) and learner rank 1 SIGKILLed after the step-16 checkpoint (the run names the
    rank and step, recreates the learner group, learner.max_restarts = 1, and continues from that
    checkpoint); then everything SIGKILLed while the step-24 checkpoint is being written
    (a test hook fires after the ranks' files, before `latest`): the torn checkpoint is ignored, the
    run resumes from step 16 and runs the search at 32 from the anchor restored from that
    checkpoint. The run must log every step once and reproduce an uninterrupted run's metrics and
    EffOPD decisions."""
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    foresight("run", SMOKE, *run_overrides(models, ref_out), *EFF)
    ref_client, ref_runs = mlflow_run(ref_out)
    ref_id = ref_runs[0].info.run_id
    accepted = history(ref_client, ref_id, "effopd/accepted_k")
    assert any(k > 0 for s, k in accepted if s < 16), "no jump accepted: the test would not exercise the anchor"

    proc = start_run(models, out, *EFF)
    wait_for(lambda: (out / "smoke" / "mlflow_run_id").is_file(), proc)  # its MLflow run exists, no checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest(out) == "", "the first kill should come before the first checkpoint"
    proc = start_run(models, out, *EFF, env={"FORESIGHT_FAULTS": "kill_in_save:24"})
    pids = out / "smoke" / "actors"
    killed = {}
    for role, after in (("rollout-0", 8), ("evaluator-0", 8), ("teacher-0", 8), ("learner-1", 16)):
        wait_for(reached(out, after), proc)
        killed[role] = int((pids / f"{role}.pid").read_text())
        os.kill(killed[role], signal.SIGKILL)
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, printed[-4000:]  # the hook killed the whole run mid-save
    assert "learner rank(s) [1] died at step" in printed and "continuing from checkpoint step0000016" in printed
    assert latest(out) == "step0000016" and (out / "smoke" / "checkpoints" / "step0000024").is_dir()  # torn, ignored
    for role, pid in killed.items():  # a new process for each killed actor (Ray's restart, or the recreated learner group)
        assert int((pids / f"{role}.pid").read_text()) != pid, role
    resumed = foresight("run", SMOKE, *run_overrides(models, out), *EFF)
    assert "resuming from step0000016" in resumed.stderr
    client, runs = mlflow_run(out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    for key in ["effopd/accepted_k", "effopd/base_score"] + [f"effopd/score_k{k}" for k in range(1, 6)]:
        assert history(client, run_id, key) == history(ref_client, ref_id, key), key
    assert_same_metrics(client, run_id, ref_client, ref_id)


def test_teacher_kl_validation_score(cluster):
    """V = -mean reverse KL on the candidate's own D_v samples, recomputed independently here."""
    from core.modeling import gather_logp, generate, load_model, load_tokenizer, response_logits

    learners, acfg = cluster["learners"], {**cluster["acfg"], "val_score": "teacher_kl"}
    opd_step(learners, cluster["acfg"], 3)  # whatever earlier tests did, W_t != anchor
    current = publish(learners, version=20)
    got = CandidateEvaluator(acfg).score(candidates(learners, [0.0, 2.0]))
    student, teacher = load_model(acfg["student_path"]), load_model(acfg["teacher_path"])
    tok = load_tokenizer(acfg["student_path"])
    w = fetch_state_dict(current)
    student.load_state_dict(w, strict=False)
    val = __import__("core.task", fromlist=["build_task"]).build_task(acfg["task_cfg"]).validation_set(50, acfg["seed"])
    out = generate(student, tok, [e.prompt for e in val], 6, greedy=False, seed=acfg["seed"] + 12345)
    with torch.no_grad():
        s = gather_logp(torch.log_softmax(response_logits(student, out["input_ids"], out["attention_mask"], out["prompt_len"]), -1), out["response"])
        q = gather_logp(torch.log_softmax(response_logits(teacher, out["input_ids"], out["attention_mask"], out["prompt_len"]), -1), out["response"])
    m = out["response_mask"]
    assert got[0] == pytest.approx(-float(((s - q) * m).sum() / m.sum()), abs=1e-5)
    assert got[0] < 0 and got[1] != got[0]


def test_sampled_validation_score_is_the_accuracy_of_one_seeded_t1_answer_per_item(cluster):
    """`method.score: sampled` (the authors' V: one answer per D_v item at T = 1.0), recomputed
    independently here; a second evaluator scores the same (a resumed run decides the same)."""
    from core.modeling import decode_responses, generate, load_model, load_tokenizer
    from core.task import build_task, exact_match

    learners, acfg = cluster["learners"], {**cluster["acfg"], "val_score": "sampled"}
    handles = candidates(learners, [0.0, 4.0])
    got = CandidateEvaluator(acfg).score(handles)
    assert CandidateEvaluator(acfg).score(handles) == got
    student, tok = load_model(acfg["student_path"]), load_tokenizer(acfg["student_path"])
    student.load_state_dict(fetch_state_dict(handles[0]), strict=False)
    val = build_task(acfg["task_cfg"]).validation_set(acfg["val_size"], acfg["seed"])
    out = generate(student, tok, [e.prompt for e in val], acfg["rollout"]["max_new_tokens"], greedy=False,
                   temperature=1.0, seed=acfg["seed"] + 12345)
    texts = decode_responses(tok, out["response"], out["response_mask"])
    assert got[0] == sum(exact_match(t, e.answer) for t, e in zip(texts, val)) / len(val)


def test_non_finite_step_is_skipped_on_every_rank(cluster):
    """A NaN in one step's teacher scores: the global gradient norm is non-finite, ZeRO-3 skips the
    optimizer step on both ranks (master and working partitions unchanged), and the next finite
    step trains again."""
    learners, acfg = cluster["learners"], cluster["acfg"]
    batch = RolloutWorker(acfg).generate(2, batch_indices(2, 20000, 64, 0), None)
    scores = TeacherScorer(acfg).score(batch, full=True)
    broken = {**scores, "logp_full": scores["logp_full"].clone()}
    broken["logp_full"][3, 1, :] = float("nan")
    before = ray.get(learners.call("partition_state"))
    stats = ray.get(learners.call("train_step", [[ray.put(batch), ray.put(broken), 64]], SPEC, 2))
    assert [s["skipped"] for s in stats] == [1.0, 1.0]
    after = ray.get(learners.call("partition_state"))
    for b, a in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(b["master"] + b["working"], a["master"] + a["working"]))
    stats = ray.get(learners.call("train_step", [[ray.put(batch), ray.put(scores), 64]], SPEC, 3))
    assert [s["skipped"] for s in stats] == [0.0, 0.0]
    moved = ray.get(learners.call("partition_state"))
    assert any(not torch.equal(x, y) for x, y in zip(before[0]["master"], moved[0]["master"]))


def test_run_stops_after_consecutive_non_finite_steps_with_its_checkpoint_intact(models, tmp_path):
    """NaN teacher scores from step 5 on (a test hook): steps 5 and 6 are skipped, the run stops with a
    clear error at the second one in a row, and its last checkpoint (step 4) is the last good state."""
    import subprocess
    import sys

    from conftest import ROOT, TEST_ENV

    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", SMOKE, *run_overrides(models, tmp_path),
                           "run.steps=12", "checkpoint.every=2", "learner.max_skipped_steps=2", "geometry.every=0",
                           "learner.world_size=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **TEST_ENV, "FORESIGHT_FAULTS": "nan_teacher:5-"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "steps 5..6 had a non-finite loss or gradient" in proc.stderr and "step0000004" in proc.stderr
    assert latest(tmp_path) == "step0000004"
    client, runs = mlflow_run(tmp_path)
    assert runs[0].info.status == "FAILED"
    assert history(client, runs[0].info.run_id, "train/step_skipped") == [(s, float(s >= 5)) for s in range(1, 7)]


def test_bf16_the_point_scored_is_the_point_applied(cluster, models, tmp_path):
    """bf16 working weights with fp32 masters (the GPU default), two ZeRO-3 ranks, the paper's lr 1e-6:
    the candidate an evaluator scores is formed from the fp32 masters and the anchor on the ranks, so
    the model it holds is bit for bit the model a rollout worker holds after the learner jumps there,
    and the masters moved by exactly c (W - A) in fp32. (At a724879 the evaluator extrapolated the
    bf16 copies of W and A, and the scored and applied points differed by ~95% of the jump.)"""
    cfg = load_config(SMOKE, model_overrides(models) + [f"run.output_dir={tmp_path}", "learner.dtype=bf16",
                                                        "learner.lr=1e-6"])
    acfg = actor_config(cfg)
    learners = ActorGroup(Learner, 2, lambda r: (r, 2, acfg), {"num_cpus": 0.25})
    try:
        start_learners(learners)
        ray.get(learners.call("set_anchor"))
        opd_step(learners, acfg, 1)
        before = ray.get(learners.call("partition_state"))
        assert before[0]["working"][0].dtype == torch.bfloat16 and before[0]["master"][0].dtype == torch.float32
        coef = coefficient(5)
        evaluator, rollout = CandidateEvaluator(acfg), RolloutWorker(acfg)
        evaluator.score([publish(learners, "candidate", -1, coef)])
        ray.get(learners.call("extrapolate", coef))
        rollout.sync(publish(learners, version=7))
        scored, applied = dict(evaluator.model.named_parameters()), dict(rollout.model.named_parameters())
        assert all(torch.equal(scored[k], applied[k]) for k in applied)
        w0 = load_file(str(models / "student" / "model.safetensors"))
        assert any(not torch.equal(applied[k], w0[k]) for k in w0), "the jump moved nothing"
        after = ray.get(learners.call("partition_state"))
        for b, a in zip(before, after):
            for m0, anc, m1, w1 in zip(b["master"], b["anchor"], a["master"], a["working"]):
                assert torch.equal(m1, extrapolate(m0, anc, coef)) and torch.equal(w1, m1.to(torch.bfloat16))
    finally:
        ray.get(learners.call("shutdown"))
        learners.kill()
