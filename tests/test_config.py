"""Config validation: every bad input exits 2 with file, key and reason before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, foresight, model_overrides
from orchestrator.config import ConfigError, load_config, parse_overrides
from orchestrator.plan import resolve
from orchestrator.sweep import expand, is_sweep
from orchestrator.config import read_yaml
from orchestrator.scales import SCALES, parse_cluster


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_overrides_parse_nested_and_typed():
    assert parse_overrides(["learner.lr=3e-5", "run.name=x", "loss.importance_correction=false"]) == {
        "learner": {"lr": 3e-5}, "run": {"name": "x"}, "loss": {"importance_correction": False}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["learner.lr"])


@pytest.mark.parametrize("text, key, reason", [
    ("learner:\n  lrr: 1e-4\n", "learner.lrr", "unknown key"),
    ("learner:\n  lr: fast\n", "learner.lr", "valid number"),
    ("learner:\n  lr: -1\n", "learner.lr", "greater than 0"),
    ("learner:\n  world_size: 0\n", "learner.world_size", "greater than or equal to 1"),
    ("method:\n  type: magic\n", "method", "magic"),
    ("method:\n  type: exopd\n  lam: 0.5\n", "method.lam", "greater than 1"),
    ("run: [1, 2\n", "line", "invalid YAML"),
    ("- a\n- b\n", "<root>", "expected a mapping"),
    ("rollout:\n  batch_prompts: 1\n", "<root>", "smaller than learner.world_size"),
    ("rollout:\n  backend: sglang\n", "rollout.backend", "'hf' or 'vllm'"),
    ("teacher:\n  backend: vllm\nloss:\n  type: forward_kl\n", "<root>", "full distribution"),
    ("learner:\n  weight_sync: nccl\n", "<root>", "rollout.backend=vllm"),
])
def test_bad_values_name_file_key_reason(tmp_path, fake_models, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, model_overrides(fake_models))
    assert str(path) in str(err.value) and err.value.key.startswith(key) and reason in str(err.value)


def test_missing_model_path(tmp_path, fake_models):
    path = write(tmp_path, "run:\n  steps: 3\n")
    cfg = load_config(path, model_overrides(fake_models) + [f"models.student={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, path, cpus=2)
    assert err.value.key == "models.student" and "no HF checkpoint" in err.value.reason


def student_with_heads(tmp_path: Path, hidden: int, heads: int) -> str:
    """A `models.student=` override to a folder whose config.json has this attention geometry."""
    import json

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                            "num_attention_heads": heads}))
    return f"models.student={tmp_path / 'm'}"


def test_vllm_backend_rejects_head_sizes_its_cpu_attention_lacks(tmp_path, fake_models):
    cfg = load_config(None, model_overrides(fake_models) + [student_with_heads(tmp_path, 64, 4), "rollout.backend=vllm"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "exp.yaml", cpus=2)
    assert err.value.key == "rollout.backend" and "head size 16" in err.value.reason


def test_nccl_weight_sync_needs_gpus(tmp_path, fake_models):
    cfg = load_config(None, model_overrides(fake_models) + [student_with_heads(tmp_path, 64, 2), "rollout.backend=vllm",
                                                            "learner.weight_sync=nccl"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "exp.yaml", cpus=2)
    assert err.value.key == "learner.weight_sync" and "CUDA" in err.value.reason


def test_world_size_larger_than_cluster(tmp_path, fake_models):
    cfg = load_config(write(tmp_path, "learner:\n  world_size: 4\n"), model_overrides(fake_models))
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "exp.yaml", cpus=2)
    assert err.value.key == "learner.world_size" and "2 CPUs" in err.value.reason
    resolve(cfg, "exp.yaml", cpus=8)  # fits a bigger cluster


def test_cli_exits_2_before_writing_anything(tmp_path, fake_models):
    out = tmp_path / "out"
    path = write(tmp_path, f"run:\n  output_dir: {out}\nlearner:\n  bogus: 1\n")
    proc = foresight("run", str(path), *model_overrides(fake_models), check=False)
    assert proc.returncode == 2
    assert f"{path}: learner.bogus: unknown key" in proc.stderr
    assert not out.exists()
    proc = foresight("run", str(path), "learner.world_size=64", "learner.bogus=", check=False)
    assert proc.returncode == 2


def test_sweep_errors(tmp_path, fake_models):
    bad_axis = write(tmp_path, "sweep: s\nbase: {}\nmatrix:\n  method.type: []\n")
    with pytest.raises(ConfigError, match="matrix.method.type: must be a non-empty list"):
        expand(bad_axis, model_overrides(fake_models))
    bad_key = write(tmp_path, "sweep: s\nbase: {}\nmatrix:\n  learner.nope: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        expand(bad_key, model_overrides(fake_models))
    assert err.value.key == "matrix.learner.nope"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_parse_and_plan(path, fake_models):
    overrides = model_overrides(fake_models)
    cfgs = [t.cfg for t in expand(path, overrides)[1]] if is_sweep(read_yaml(path)) else [load_config(path, overrides)]
    for cfg in cfgs:
        if SCALES[cfg.run.scale].gpu:  # GPU grids are checked as dry runs against the papers' cluster size
            plan = resolve(cfg, path, cluster=parse_cluster("4x8xH100-80GB"))
            assert 0 < plan.gpu.gpus <= 32 and plan.concurrent >= 1
        else:
            plan = resolve(cfg, path, cpus=2)
            assert plan.total_cpus <= 2
