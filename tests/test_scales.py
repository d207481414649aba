"""Scale registry and GPU resource plans, checked without GPUs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import foresight
from orchestrator.scales import (QWEN3_32B, SCALES, ClusterSpec, concurrent_trials, engine_mem_gb, learner_mem_gb,
                                 parse_cluster, plan_gpus)


def test_parse_cluster_specs(tmp_path):
    assert parse_cluster("4x8xH100-80GB") == ClusterSpec(4, 8, "H100", 80.0)
    (tmp_path / "c.yaml").write_text("nodes: 2\ngpus_per_node: 8\ngpu: H20\ngpu_mem_gb: 96\n")
    assert parse_cluster(str(tmp_path / "c.yaml")).gpus == 16
    with pytest.raises(ValueError, match="NODESxGPUSxTYPE"):
        parse_cluster("eight H100s")


def test_memory_formulas_by_hand():
    # ZeRO-3: 16 bytes/param over N ranks; activations L*T*h*2 + 34*T*h; logits 2048*V*4
    psi, n, T = 32.8e9, 12, 22_000
    want = (16 * psi / n + 64 * T * 5120 * 2 + 34 * T * 5120 + 2048 * 151_936 * 4) / 1e9
    assert learner_mem_gb(QWEN3_32B, n, T) == pytest.approx(want)
    # vLLM: bf16 weights / TP + K,V for one 18,432-token sequence / TP
    kv = 18_432 * 2 * 64 * 8 * 128 * 2
    assert engine_mem_gb(QWEN3_32B, 4, 18_432) == pytest.approx((2 * psi / 4 + kv / 4) / 1e9)


def test_32b_learner_on_one_gpu_is_rejected():
    plan = plan_gpus(SCALES["32B"], ClusterSpec(1, 1, "H100", 80), seq_len=18_432)
    assert any("tensor parallel 4 > 1" in e for e in plan.errors)
    one_rank = plan_gpus(replace(SCALES["32B"], learner_ranks=1), ClusterSpec(4, 8, "H100", 80), seq_len=18_432)
    assert any(e.startswith("learner: needs") for e in one_rank.errors)  # 16 bytes x 32.8B params on one GPU
    assert not any(e.startswith("learner") for e in plan_gpus(SCALES["32B"], ClusterSpec(4, 8, "H100", 80), seq_len=18_432).errors)


def test_evaluator_pool_without_spare_gpus_is_rejected():
    one_node = ClusterSpec(1, 8, "H100", 80)
    ok = plan_gpus(SCALES["4B"], one_node, seq_len=18_432, evaluators=1)
    assert not ok.errors and ok.gpus == 8
    full = plan_gpus(SCALES["4B"], one_node, seq_len=18_432, evaluators=2)
    assert any("evaluator pool with no spare GPUs" in e for e in full.errors)


def test_concurrency_and_placement_keep_tp_groups_on_one_node():
    cluster = ClusterSpec(4, 8, "H100", 80)
    plan = plan_gpus(SCALES["14B"], cluster, seq_len=18_432, evaluators=2)
    assert not plan.errors
    assert concurrent_trials(plan, cluster) == cluster.gpus // plan.gpus
    for roles in plan.placement:
        assert sum(int(r.split("x")[-1]) for r in roles) <= 8


def test_plan_cli_dry_run_and_rejection(fake_models):
    ok = foresight("plan", "experiments/paper_grid.yaml", "--cluster", "4x8xH100-80GB", "--brief")
    assert "16 trials" in ok.stdout and "GPU-hours" in ok.stdout
    bad = foresight("plan", "experiments/paper_grid.yaml", "--cluster", "1x1xH100-80GB", "--brief", check=False)
    assert bad.returncode == 2 and "run.scale" in bad.stderr and "the cluster has 1" in bad.stderr
    gpu_here = foresight("plan", "experiments/smoke.yaml", "run.scale=4B", f"models.student={fake_models / 'student'}",
                         f"models.teacher={fake_models / 'teacher'}", check=False)
    assert gpu_here.returncode == 2 and "run.scale: scale 4B needs GPUs" in gpu_here.stderr
