"""Scale registry, trial plans (roles, GPUs, TP, placement, cost), checked without GPUs."""

from __future__ import annotations

import pytest

from conftest import foresight
from core.config import ConfigError, load_config
from orchestrator.placement import learner_env, nccl_layout
from orchestrator.plan import resolve
from core.scales import (QWEN3_32B, QWEN25_7B, ClusterSpec, concurrent_trials, engine_mem_gb, first_fit,
                                 learner_mem_gb, parse_cluster, usable_gb)

H100x32 = ClusterSpec(4, 8, "H100", 80)


def gpu_plan(*overrides: str, cluster: ClusterSpec = H100x32):
    """The registry's layout unless the overrides ask for the balanced one (tests of it: test_balance.py)."""
    return resolve(load_config(None, ["plan.layout=registry", *overrides]), "exp.yaml", cluster=cluster)


def test_parse_cluster_specs(tmp_path):
    assert parse_cluster("4x8xH100-80GB") == ClusterSpec(4, 8, "H100", 80.0)
    (tmp_path / "c.yaml").write_text("nodes: 2\ngpus_per_node: 8\ngpu: H20\ngpu_mem_gb: 96\n")
    assert parse_cluster(str(tmp_path / "c.yaml")).gpus == 16
    with pytest.raises(ValueError, match="NODESxGPUSxTYPE"):
        parse_cluster("eight H100s")
    with pytest.raises(ValueError, match="unknown GPU type 'B300'"):
        parse_cluster("1x8xB300-288GB")


def test_memory_formulas_by_hand():
    # the GPU path (bf16, fused Adam, gradient checkpointing), Qwen3-32B on 12 ZeRO-3 ranks, 22k tokens per GPU
    psi, n, T, L, h, V, kv = 32.8e9, 12, 22_000, 64, 5120, 151_936, 8 * 128
    inter = ((psi - 2 * V * h) / L - 2 * h * h - 2 * h * kv) / (3 * h)  # MLP width from the parameter count
    states = 18 * psi / n + 2 * 5e8  # bf16 weights, fp32 grads (accumulated in fp32), master, Adam; the reduce bucket
    layer = T * ((8 * h + 2 * kv + 4 * inter) * 2 + 2 * 2 * h)  # one layer recomputed (RMSNorm's fp32 input)
    logits = 2048 * V * (2 + 4 * 3)  # bf16 logits, fp32 copy, log-softmax, its gradient
    backward = L * T * h * 2 + 2 * 1e9 + max(layer, logits)  # checkpoints + live gathered params (1e9 cap)
    step = 4 * 1e9 + 2 * 1e9  # fp32 gradient of one 1e9-element sub-group + its bf16 flat copy
    # setup: the largest module built whole under zero.Init (the embedding), or the partitions + a sub-group's grad
    want = max(2 * V * h, 10 * psi / n + 4e9, states + max(backward, step)) / 1e9
    assert learner_mem_gb(QWEN3_32B, n, T) == pytest.approx(want)
    # EffOPD: the fp32 anchor and the last search's direction (bf16), partition-local
    assert learner_mem_gb(QWEN3_32B, n, T, anchor=True) == pytest.approx(want + 6 * psi / n / 1e9)
    # 12 ranks no longer fit an 80 GB GPU once CUDA/NCCL context and fragmentation are kept free: 16 do
    assert learner_mem_gb(QWEN3_32B, n, T, anchor=True) > usable_gb(80) > learner_mem_gb(QWEN3_32B, 16, T, anchor=True)
    assert usable_gb(80) == pytest.approx(80 * 0.95 - 1.5)
    # vLLM: bf16 weights / TP + K,V for one 18,432-token sequence / TP
    kv_seq = 18_432 * 2 * 64 * 8 * 128 * 2
    assert engine_mem_gb(QWEN3_32B, 4, 18_432) == pytest.approx((2 * psi / 4 + kv_seq / 4) / 1e9)
    assert QWEN25_7B.vocab == 152_064


def test_memory_formulas_cpu_fp32_path():
    from core.scales import ModelShape, learner_mem_phases

    # the benchmark's Qwen2 (64M, hidden 512, 8 layers, 2 KV heads of 64, I 2048, V 32768) on the fp32 CPU path
    shape = ModelShape("qwen2-64m", 0.064, 8, 512, 2, 64, 32_768)
    psi, V, T, R = 0.064e9, 32_768, 896, 384  # 2 ranks: 64 sequences x 14 tokens, 6 sampled each
    states = 20 * psi / 2 + 4 * psi  # 4 working + 4 grads + 4 master + 8 Adam; the reduce bucket holds every grad
    backward = 8 * T * (8 * 512 + 2 * 128 + 4 * 2048) * 4 + 4 * psi + R * V * 12  # no checkpointing
    step = 4 * psi / 2 + 8 * psi / 2  # fp32 gradient + torch AdamW's two temporaries (sqrt(v), its quotient)
    got = learner_mem_gb(shape, 2, T, dtype="fp32", cuda=False, checkpointing=False, response_tokens=R,
                         intermediate=2048)
    assert got == pytest.approx((states + max(backward, step)) / 1e9)
    phases = learner_mem_phases(shape, 1, 2 * T, dtype="fp32", cuda=False, intermediate=2048, response_tokens=2 * R)
    assert phases["backward"]["gathered"] == 4 * V * 512  # one rank: a gathered parameter is its partition
    # HF rollout worker: fp32 weights + KV of the batch + every sampled step's fp32 logits (kept by generate)
    rollout = engine_mem_gb(shape, 1, 14, batch=128, dtype="fp32", sampled=6)
    assert rollout == pytest.approx((4 * psi + 128 * 14 * 2 * 8 * 128 * 4 + 128 * 6 * V * 4) / 1e9)


def test_gpu_plan_roles_follow_the_registry_and_yaml_overrides():
    plan = gpu_plan("run.scale=1.5B", "method.type=effopd")
    got = {r.role: (r.actors, r.gpus, r.tp, r.backend) for r in plan.roles}
    assert got == {"rollout": (2, 1, 1, "vllm"), "teacher": (1, 1, 1, "vllm"), "learner": (4, 1, 1, "deepspeed"),
                   "evaluator": (5, 1, 1, "vllm")}
    assert plan.total_gpus == 12 and plan.weight_sync == "nccl"
    assert plan.bundles()[plan.first_bundle("learner")] == {"CPU": 0.5, "GPU": 1.0}
    assert len(plan.bundles()) == 12 and plan.first_bundle("evaluator") == 7
    custom = gpu_plan("run.scale=14B", "rollout.num_workers=3", "rollout.tensor_parallel=4", "teacher.backend=hf",
                      "teacher.tensor_parallel=1", "learner.world_size=6")
    got = {r.role: (r.actors, r.gpus, r.tp, r.backend) for r in custom.roles}
    assert got == {"rollout": (3, 4, 4, "vllm"), "teacher": (1, 1, 1, "hf"), "learner": (6, 1, 1, "deepspeed")}
    with pytest.raises(ConfigError, match="backend hf runs on one GPU; tensor parallel 2 needs backend vllm"):
        gpu_plan("run.scale=14B", "teacher.backend=hf")


def test_32b_learner_on_one_gpu_is_rejected():
    with pytest.raises(ConfigError, match="tensor parallel 4 > 1"):
        gpu_plan("run.scale=32B", cluster=ClusterSpec(1, 1, "H100", 80))
    with pytest.raises(ConfigError, match="learner: needs"):  # 16 bytes x 32.8B params on one GPU
        gpu_plan("run.scale=32B", "learner.world_size=1")
    assert gpu_plan("run.scale=32B").role("learner").mem_gb < 80


def test_evaluator_pool_without_spare_gpus_is_rejected():
    one_node = ClusterSpec(1, 8, "H100", 80)
    ok = gpu_plan("run.scale=4B", "method.type=effopd", "method.num_evaluators=1", cluster=one_node)
    assert ok.total_gpus == 8
    with pytest.raises(ConfigError, match="evaluator pool with no spare GPUs"):
        gpu_plan("run.scale=4B", "method.type=effopd", "method.num_evaluators=2", cluster=one_node)


def test_placement_keeps_tp_groups_on_one_node_and_counts_concurrent_trials():
    plan = gpu_plan("run.scale=14B", "method.type=effopd", "method.num_evaluators=2")
    gpus = [r.gpus for r in plan.roles for _ in range(r.actors)]
    per_node = [0] * 4
    for node, g in zip(plan.nodes, gpus):
        per_node[node] += g
    assert all(used <= 8 for used in per_node)
    assert plan.concurrent == concurrent_trials(gpus, H100x32) == 1
    assert first_fit([4, 4, 4], [8, 2]) is None and first_fit([4, 4], [8, 2]) == [0, 0]


def test_reserved_gpu_hours_are_gpus_times_serial_wall_time():
    plan = gpu_plan("run.scale=1.5B", "run.steps=100", "rollout.batch_prompts=1024", "rollout.max_new_tokens=16384")
    seconds = plan.cost.seconds
    assert set(seconds) >= {"rollout", "teacher", "learner", "sync", "eval"}
    assert plan.reserved_gpu_hours == pytest.approx(plan.total_gpus * sum(seconds.values()) * 100 / 3600)
    # busy: 2 rollout engines sample and evaluate, 1 teacher scores, 4 ranks train and sync
    busy = 2 * (seconds["rollout"] + seconds["eval"]) + seconds["teacher"] + 4 * (seconds["learner"] + seconds["sync"])
    assert plan.busy_gpu_hours == pytest.approx(busy * 100 / 3600)
    assert plan.reserved_gpu_hours > 3 * plan.busy_gpu_hours  # the registry's serial loop leaves most GPUs idle


def test_nccl_rank_offsets_are_disjoint_at_tp2():
    offsets, world = nccl_layout([2, 2, 2])
    ranks = [set(range(o, o + 2)) for o in offsets]
    assert offsets == [1, 3, 5] and world == 7
    assert not set.intersection(*ranks) and set.union(*ranks) == set(range(1, 7))  # rank 0: the learner


def test_learner_env_from_placement():
    one = learner_env([{"node_id": "a", "ip": "10.0.0.1"}, {"node_id": "a", "ip": "10.0.0.1"}])
    assert [e["MASTER_ADDR"] for e in one] == ["127.0.0.1"] * 2  # a single node: loopback only
    # LOCAL_RANK is the CUDA device each rank selects: its one GPU is cuda:0 of its actor
    assert [e["LOCAL_RANK"] for e in one] == [0, 0] and [e["NODE_INDEX"] for e in one] == [0, 1]
    assert {e["LOCAL_WORLD_SIZE"] for e in one} == {2}
    two = learner_env([{"node_id": n, "ip": ip} for n, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("a", "10.0.0.1"))])
    assert {e["MASTER_ADDR"] for e in two} == {"10.0.0.1"} and {e["WORLD_SIZE"] for e in two} == {3}
    assert [e["RANK"] for e in two] == [0, 1, 2] and [e["LOCAL_RANK"] for e in two] == [0, 0, 0]
    assert [e["NODE_INDEX"] for e in two] == [0, 0, 1]
    assert [e["LOCAL_WORLD_SIZE"] for e in two] == [2, 1, 2]


def test_plan_cli_dry_run_and_rejection(fake_models):
    ok = foresight("plan", "experiments/paper_grid.yaml", "--cluster", "4x8xH100-80GB", "--brief")
    assert "16 trials" in ok.stdout and "reserved GPU-hours" in ok.stdout and "learner" in ok.stdout
    bad = foresight("plan", "experiments/paper_grid.yaml", "--cluster", "1x1xH100-80GB", "--brief", check=False)
    assert bad.returncode == 2 and "run.scale" in bad.stderr and "needs 7 GPUs, the cluster has 1" in bad.stderr
    unknown = foresight("plan", "experiments/paper_grid.yaml", "--cluster", "4x8xTPU-80GB", "--brief", check=False)
    assert unknown.returncode == 2 and "unknown GPU type" in unknown.stderr
    paper = foresight("plan", "experiments/paper_1p5b_math.yaml", "--cluster", "1x8xH100-80GB")
    assert "scale 1.5B on 1x8xH100-80GB:" in paper.stdout and "layout balanced (gpu_time)" in paper.stdout
    assert "registry: rollout 2, teacher 1, learner 4" in paper.stdout and "303 steps" in paper.stdout
    assert "format: verl" in paper.stdout and "enable_thinking: false" in paper.stdout
    gpu_here = foresight("plan", "experiments/smoke.yaml", "run.scale=4B", f"models.student={fake_models / 'student'}",
                         f"models.teacher={fake_models / 'teacher'}", check=False)
    assert gpu_here.returncode == 2 and "run.scale: scale 4B needs GPUs" in gpu_here.stderr


def test_pipelined_gpu_hours_use_the_critical_path_on_the_steps_that_overlap():
    args = ("run.scale=1.5B", "run.steps=100", "rollout.batch_prompts=1024", "rollout.max_new_tokens=16384",
            "eval.every=10", "checkpoint.every=20")
    serial, one, two = gpu_plan(*args), gpu_plan(*args, "pipeline.max_staleness=1"), gpu_plan(*args, "pipeline.max_staleness=2")
    s = two.cost.seconds
    # barriers (evaluations every 10, checkpoints every 20) at 9 of steps 1..99: steps 1, 11, ..., 91 run alone
    assert s == serial.cost.seconds and two.cost.overlap == pytest.approx(0.9) and serial.cost.overlap == 0
    rest = sum(v for k, v in s.items() if k not in ("rollout", "teacher", "learner", "sync"))
    consume, serial_step = s["learner"] + s["sync"], s["rollout"] + s["teacher"] + s["learner"] + s["sync"]
    # staleness 1: the batch of step t+1 is sampled once W_t exists, so its rollout and scoring run in turn
    piped1 = 0.9 * max(s["rollout"] + s["teacher"], consume) + 0.1 * serial_step + rest
    # staleness 2: the teacher scores batch t+1 while the rollout samples batch t+2
    piped2 = 0.9 * max(s["rollout"], s["teacher"], consume) + 0.1 * serial_step + rest
    assert one.cost.step_seconds == pytest.approx(piped1) and two.cost.step_seconds == pytest.approx(piped2)
    assert two.reserved_gpu_hours == pytest.approx(two.total_gpus * piped2 * 100 / 3600)
    assert two.reserved_gpu_hours < one.reserved_gpu_hours < serial.reserved_gpu_hours
    assert "pipelined, staleness 2, on 90% of steps" in two.describe()


def test_gpu_hours_count_the_named_evaluation_sets(tmp_path):
    """eval.sets sampling (the paper: avg@32 every 2 steps) is decoding on the rollout engines:
    (greedy + k) sequences per prompt, prompts from num_examples or the file's rows, per eval.every."""
    from core.cost_model import Workload, decode_seconds

    rows = tmp_path / "aime.jsonl"
    rows.write_text("".join(f'{{"prompt": "p{i}", "answer": "{i}"}}\n' for i in range(30)))
    (tmp_path / "train.jsonl").write_text(rows.read_text())
    base = ("run.scale=1.5B", "task.type=jsonl", f"task.train_path={tmp_path / 'train.jsonl'}",
            f"task.test_path={tmp_path / 'train.jsonl'}", "eval.every=2", "rollout.max_new_tokens=16384")
    plain = gpu_plan(*base)
    sets = gpu_plan(*base, f"eval.sets={{aime: {{path: {rows}, greedy: false, k: 32}}, "
                           f"gone: {{path: {tmp_path / 'gone.jsonl'}, k: 4}}}}")
    r = sets.role("rollout")
    work = Workload(30 * 32, 2048 // 4, 16384)  # rollout.max_prompt_tokens 2048: the cost model's prompt is a quarter
    c = sets.costing
    want = decode_seconds(c.student, c.device, c.thr, r.actors, r.tp, work, "vllm", c.kv_tokens(sets.layout)) / 2
    assert "eval_sets" not in plain.cost.seconds and sets.cost.seconds["eval_sets"] == pytest.approx(want)
    assert sets.reserved_gpu_hours > plain.reserved_gpu_hours
    assert any("eval.sets.gone" in n and "not in the GPU-hours" in n for n in sets.notes)


def test_multi_node_output_dir_is_absolute_and_shared(tmp_path, fake_models):
    """A trial spanning nodes needs one run folder all nodes mount: a relative run.output_dir is refused
    before launch (noted in a dry run), and at launch every learner rank must read the driver's marker."""
    from pathlib import Path

    from orchestrator.placement import SharedDirError, check_shared_output
    from core.scales import parse_cluster

    models = [f"models.student={fake_models / 'student'}", f"models.teacher={fake_models / 'teacher'}"]
    cfg = load_config(None, models + ["run.scale=32B", "run.output_dir=runs"])
    plan = resolve(cfg, "exp.yaml", cluster=parse_cluster("4x8xH100-80GB"))
    assert len(set(plan.nodes)) > 1 and any("run.output_dir 'runs' is relative" in n for n in plan.notes)
    with pytest.raises(ConfigError) as err:  # the same plan on a live 4-node cluster
        plan_live(cfg)
    assert err.value.key == "run.output_dir"
    plan_live(load_config(None, models + ["run.scale=32B", f"run.output_dir={tmp_path}"]))  # absolute: fine

    def read(path, token):  # rank 1 sits on a node that does not mount the folder
        return [Path(path).read_text() == token, False]

    envs = [{"node_id": "a"}, {"node_id": "b"}]
    with pytest.raises(SharedDirError, match=r"learner rank\(s\) \[1\] cannot read"):
        check_shared_output(read, envs, tmp_path)
    check_shared_output(lambda path, token: [Path(path).read_text() == token] * 2, envs, tmp_path)
    assert not list(tmp_path.glob(".shared-*"))  # the marker is removed either way


def plan_live(cfg):
    """`resolve` as `foresight run` calls it on a live cluster of four 8-GPU nodes (no Ray needed)."""
    from unittest import mock

    from orchestrator import plan as plan_mod
    from core.scales import ClusterSpec

    with mock.patch.object(plan_mod, "live_cluster", return_value=ClusterSpec(4, 8, "H100", 80.0)), \
            mock.patch.object(plan_mod, "check_backends"), mock.patch.object(plan_mod, "check_models"):
        return plan_mod.resolve(cfg, "exp.yaml", resources={"CPU": 64.0, "GPU": 32.0})
