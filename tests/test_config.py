"""Config validation: every bad input exits 2 with file, key and reason before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, foresight, model_overrides
from core.config import ConfigError, load_config, parse_overrides
from orchestrator.plan import resolve
from orchestrator.sweep import expand, is_sweep
from core.config import read_yaml
from core.scales import SCALES, parse_cluster


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
    ("method:\n  type: exopd\n  lam: 0.5\n", "method.lam", "greater than or equal to 1"),
    ("run: [1, 2\n", "line", "invalid YAML"),
    ("- a\n- b\n", "<root>", "expected a mapping"),
    ("rollout:\n  backend: sglang\n", "rollout.backend", "'hf' or 'vllm'"),
])
def test_bad_values_name_file_key_reason(tmp_path, fake_models, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, model_overrides(fake_models))
    assert str(path) in str(err.value) and err.value.key.startswith(key) and reason in str(err.value)


@pytest.mark.parametrize("text, key, reason", [
    ("rollout:\n  batch_prompts: 1\n", "learner.world_size", "smaller than the 2 learner ranks"),
    ("teacher:\n  backend: vllm\nloss:\n  type: forward_kl\n", "loss.teacher_topk", "top-k"),
    ("learner:\n  weight_sync: nccl\n", "learner.weight_sync", "rollout.backend=vllm"),
    ("rollout:\n  tensor_parallel: 2\n", "rollout.tensor_parallel", "runs on CPUs"),
])
def test_plans_that_cannot_run_name_file_key_reason(tmp_path, fake_models, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        resolve(load_config(path, model_overrides(fake_models)), path, cpus=2)
    assert str(path) in str(err.value) and err.value.key == key and reason in err.value.reason


def teacher_only(models: Path) -> list[str]:
    """model_overrides without models.student, for tests that set their own (a key may be given once)."""
    return [o for o in model_overrides(models) if not o.startswith("models.student=")]


def test_missing_model_path(tmp_path, fake_models):
    path = write(tmp_path, "run:\n  steps: 3\n")
    cfg = load_config(path, teacher_only(fake_models) + [f"models.student={tmp_path / 'nope'}"])
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
    cfg = load_config(None, teacher_only(fake_models) + [student_with_heads(tmp_path, 64, 4), "rollout.backend=vllm"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "exp.yaml", cpus=2)
    assert err.value.key == "rollout.backend" and "head size 16" in err.value.reason


def test_nccl_weight_sync_needs_gpus(tmp_path, fake_models):
    cfg = load_config(None, teacher_only(fake_models) + [student_with_heads(tmp_path, 64, 2), "rollout.backend=vllm",
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
            assert 0 < plan.total_gpus <= 32 and plan.concurrent >= 1
        else:
            plan = resolve(cfg, path, cpus=2)
            assert plan.total_cpus <= 2


# ----------------------------------------------------------------------------- strict inputs (issue 15)
def refused(call) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        call()
    return err.value


@pytest.mark.parametrize("text, key, reason", [
    # the YAML itself
    ("run:\n  steps: 3\nrun:\n  seed: 1\n", "run", "duplicate key 'run' (line 3, column 1; first at line 1)"),
    ("learner:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "learner.lr", "duplicate key 'lr'"),
    ("task: {type: addition, digits: 2, digits: 3}\n", "task.digits", "duplicate key 'digits'"),
    ("", "<root>", "empty file"),
    ("# all defaults, please\n\n", "<root>", "empty file"),
    ("null\n", "<root>", "empty file"),
    ("run:\n  steps: 3\n---\nrun:\n  steps: 4\n", "line", "invalid YAML"),
    ("run:\n  name: x\x00\x01\n", "<file>", "binary or control characters"),  # exited 1 with a traceback
    # coercions that change meaning
    ("run:\n  steps: true\n", "run.steps", "valid integer (got True)"),
    ("run:\n  steps: 10.5\n", "run.steps", "valid integer"),
    ("run:\n  seed: '1'\n", "run.seed", "valid integer"),
    ("learner:\n  lr: true\n", "learner.lr", "valid number"),
    ("learner:\n  lr: '0.001'\n", "learner.lr", "valid number"),
    ("learner:\n  lr: .nan\n", "learner.lr", "finite number"),
    ("rollout:\n  temperature: .inf\n", "rollout.temperature", "finite number"),
    ("loss:\n  importance_correction: 'false'\n", "loss.importance_correction", "valid boolean"),
    ("eval:\n  at_powers_of_two: 1\n", "eval.at_powers_of_two", "valid boolean"),
    ("run:\n  name: 123\n", "run.name", "valid string"),
    ("loss:\n  type: 1\n", "loss.type", "Input should be 'pg_reverse_kl'"),
    ("rollout:\n  source: no\n", "rollout.source", "(got False)"),
    ("learner:\n  betas: 0.9\n", "learner.betas", "valid tuple"),
    ("learner:\n  betas: [0.9, true]\n", "learner.betas.1", "valid number"),
    # bounds
    ("learner:\n  betas: [0.9, 1.0]\n", "learner.betas.1", "less than 1"),
    ("learner:\n  betas: [-0.1, 0.99]\n", "learner.betas.0", "greater than or equal to 0"),
    ("learner:\n  betas: [0.9]\n", "learner.betas.1", "too few items"),
    ("learner:\n  weight_decay: 2\n", "learner.weight_decay", "less than or equal to 1"),
    ("run:\n  steps: 100000000\n", "run.steps", "less than or equal to 10000000"),
    ("run:\n  seed: 4294967296\n", "run.seed", "less than or equal to 4294967295"),
    ("rollout:\n  temperature: 50\n", "rollout.temperature", "less than or equal to 10"),
    ("rollout:\n  batch_prompts: 10000000\n", "rollout.batch_prompts", "less than or equal to 1000000"),
    ("rollout:\n  tensor_parallel: 128\n", "rollout.tensor_parallel", "less than or equal to 64"),
    ("teacher:\n  num_cpus: 1000\n", "teacher.num_cpus", "less than or equal to 256"),
    ("loss:\n  importance_threshold: 0.5\n", "loss.importance_threshold", "greater than or equal to 1"),
    ("checkpoint:\n  keep: 0\n", "checkpoint.keep", "greater than or equal to 1"),
    ("method:\n  type: effopd\n  num_evaluators: 64\n", "method.num_evaluators", "less than or equal to 16"),
    ("task:\n  digits: 2\n", "task", "needs a `type:` key"),
    ("task:\n  type: addition\n  digits: 1\n", "task", "more than the 10^2 distinct 1-digit problems"),
    ("run:\n  name: " + "x" * 201 + "\n", "run.name", "at most 200 characters"),
])
def test_strict_inputs_refused(tmp_path, fake_models, text, key, reason):
    path = write(tmp_path, text)
    err = refused(lambda: load_config(path, model_overrides(fake_models)))
    assert err.file == str(path) and err.key.startswith(key) and reason in err.reason, str(err)


def test_numbers_yaml_1_1_leaves_as_strings_are_numbers_and_ints_pass_for_floats(tmp_path):
    path = write(tmp_path, "run:\n  name: '1e3'\nlearner:\n  lr: 3e-5\n  weight_decay: 0\n  betas: [0, 0.5]\n"
                           "rollout:\n  temperature: 1\n")
    cfg = load_config(path, ["loss.importance_threshold=1E1", "run.seed=7"])
    assert cfg.learner.lr == 3e-5 and cfg.learner.betas == (0.0, 0.5) and cfg.rollout.temperature == 1.0
    assert cfg.run.name == "1e3" and cfg.loss.importance_threshold == 10.0 and cfg.run.seed == 7
    assert load_config(None, ["rollout.num_workers=null"]).rollout.num_workers is None  # None: the scale's


@pytest.mark.parametrize("overrides, key, reason", [
    (["learner.lr=1e-4", "learner.lr=2e-4"], "learner.lr", "duplicate key 'lr'"),
    (["run.seed=1", "run.seed=1"], "run.seed", "duplicate key 'seed'"),
    (["learner={lr: 1}", "learner.lr=2"], "learner.lr", "duplicate key 'lr'"),
    (["run.name={a: 1, a: 2}"], "run.name.a", "duplicate key 'a'"),
    (["learner.lr=[1"], "learner.lr", "invalid YAML"),
    (["run.steps=true"], "run.steps", "valid integer"),
    (["learner.lr=nan"], "learner.lr", "valid number (got 'nan')"),
    (["run.seed=-1"], "run.seed", "greater than or equal to 0"),
])
def test_bad_overrides_refused(overrides, key, reason):
    err = refused(lambda: load_config(None, overrides))
    assert err.key == key and reason in err.reason, str(err)


def load_sweep(path: Path, overrides: list[str] | None = None) -> None:
    """What `foresight plan` checks of a sweep or search file, short of resolving plans."""
    from orchestrator.search import check_search_space
    from orchestrator.sweep import parse_sweep, scheduler_options

    data = read_yaml(path)
    sf = parse_sweep(data, path)
    if sf.search is not None:
        check_search_space(sf.sweep or path.stem, sf.base, sf.search, path)
    else:
        expand(path, overrides)
        scheduler_options(data, path)


SEARCH = "search:\n  params:\n    learner.lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n"


@pytest.mark.parametrize("text, key, reason", [
    # sweep files
    ("sweep: s\nmatrix:\n  run.seed: [0, 1]\n", "base", "a sweep file needs `base:`"),
    ("sweep: s\nbase: [1]\nmatrix: {run.seed: [0]}\n", "base", "valid dictionary"),
    ("sweep: s\nbase: {}\n", "matrix", "non-empty mapping"),
    ("base: {}\nmatrix: [run.seed]\n", "matrix", "valid dictionary"),
    ("base: {}\nmatrix:\n  run.seed: 1\n", "matrix.run.seed", "valid list"),
    ("base: {}\nmatrix:\n  run.seed: [0, 0]\n", "matrix.run.seed", "listed twice"),
    ("base: {}\nmatrix:\n  learner lr: [1]\n", "matrix.learner lr", "dotted config key"),
    ("base: {}\nmatrix:\n  run.seed: [0]\n  run.seed: [1]\n", "matrix.run.seed", "duplicate key 'run.seed'"),
    ("base: {}\ninclude: {name: a}\n", "include", "valid list"),
    ("base: {}\ninclude: [{}]\n", "include.0", "non-empty mapping"),
    ("base: {}\ninclude: [{name: a, run.seed: 1}, {name: a, run.seed: 2}]\n", "include.1", "both named s_a"),
    ("base: {}\nmatrix: {run.seed: [0, 1]}\nexclude: [{run.steps: 1}]\n", "exclude.0.run.steps", "not a matrix key"),
    ("base: {}\nmatrix: {run.seed: [0, 1]}\nexclude: [{run.seed: 5}]\n", "exclude.0.run.seed", "not among"),
    ("base: {}\nmatrix: {run.seed: [0]}\nexclude: [{run.seed: 0}]\n", "exclude", "no trials left"),
    ("base: {}\nmatrix: {run.seed: [0]}\nschedule: {}\n", "schedule", "unknown key"),
    ("sweep: a b\nbase: {}\nmatrix: {run.seed: [0]}\n", "sweep", "match pattern"),
    ("sweep: 3\nbase: {}\nmatrix: {run.seed: [0]}\n", "sweep", "valid string"),
    ("base: {}\nmatrix: {run.seed: [0]}\nscheduler: {max_retries: true}\n", "scheduler.max_retries", "valid integer"),
    ("base: {}\nmatrix: {run.seed: [0]}\nscheduler: {max_concurrent: 0}\n", "scheduler.max_concurrent", "greater than 0"),
    ("base: {run: {steps: true}}\nmatrix: {run.seed: [0]}\n", "run.steps", "valid integer"),
    ("base: {}\nmatrix: {learner.lr: [1.0e-4, 2]}\n", "matrix.learner.lr", "less than or equal to 1 (got 2)"),
    # search files
    ("sweep: s\n" + SEARCH, "base", "a sweep file needs `base:`"),
    ("base: {}\nmatrix: {run.seed: [0]}\n" + SEARCH, "matrix", "not used by a search file"),
    ("base: {}\nsearch:\n  params: {learner.lr: {type: float, low: 1e-3, high: 1e-5}}\n", "search.params.learner.lr", "low < high"),
    ("base: {}\nsearch:\n  params: {learner.lr: {type: float, low: 0, high: 1e-3, log: true}}\n", "search.params.learner.lr", "low > 0"),
    ("base: {}\nsearch:\n  params: {run.seed: {type: int, low: 0, high: 2.5}}\n", "search.params.run.seed", "integer low and high"),
    ("base: {}\nsearch:\n  params: {method.type: {type: categorical, choices: [vanilla, vanilla]}}\n", "search.params.method.type", "distinct"),
    ("base: {}\nsearch:\n  params: {method.type: {type: categorical, choices: [vanilla], log: true}}\n", "search.params.method.type", "not categorical"),
    ("base: {}\nsearch:\n  params: {learner.lr: {type: float, low: 1e-5, high: 5}}\n", "search.params.learner.lr", "at learner.lr=5"),
    ("base: {}\nsearch:\n  params: {method.type: {type: categorical, choices: [vanilla, magic]}}\n", "search.params.method.type", "magic"),
    ("base: {}\n" + SEARCH + "  target: 0.5\n", "search", "target is only used by objective steps_to_target"),
    ("base: {}\n" + SEARCH + "  n_trials: true\n", "search.n_trials", "valid integer"),
    ("base: {}\n" + SEARCH + "  n_trials: 100000\n", "search.n_trials", "less than or equal to 10000"),
    ("base: {}\n" + SEARCH + "  sampler: grid\n", "search.sampler", "'tpe' or 'random'"),
    ("base: {}\n" + SEARCH + "  pruner: hyperband\n", "search.pruner", "'median', 'asha' or 'none'"),
    ("base: {}\n" + SEARCH + "  pruner: asha\n  reduction_factor: 1\n", "search.reduction_factor", "greater than or equal to 2"),
    ("base: {}\n" + SEARCH + "  points: [{learner.lr: 0.5}]\n", "search", "points.0.learner.lr: 0.5 is outside"),
    ("base: {}\n" + SEARCH + "  points: [{run.seed: 1}]\n", "search", "points.0: needs exactly the params' keys"),
    ("base: {}\n" + SEARCH + "scheduler: {max_concurrent: 0}\n", "scheduler.max_concurrent", "greater than 0"),
])
def test_bad_sweep_and_search_files_refused(tmp_path, fake_models, text, key, reason):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    err = refused(lambda: load_sweep(path, model_overrides(fake_models)))
    assert err.file == str(path) and err.key == key and reason in err.reason, str(err)


def test_valid_sweep_and_search_files_pass(tmp_path, fake_models):
    path = tmp_path / "s.yaml"
    path.write_text("sweep: s\nbase: {learner: {lr: 1e-4}}\nmatrix: {run.seed: [0, 1], learner.lr: [3e-5]}\n"
                    "exclude: [{run.seed: 1}]\ninclude: [{name: hot, rollout.temperature: 2, learner.betas: [0.8, 0.9]}]\n"
                    "scheduler: {max_retries: 0}\n")
    name, trials = expand(path, model_overrides(fake_models))
    assert [t.name for t in trials] == ["s_s0_lr3e-05", "s_hot"]
    assert trials[0].cfg.learner.lr == 3e-5 and trials[1].cfg.learner.betas == (0.8, 0.9)
    path.write_text("base: {}\n" + SEARCH + "  objective: steps_to_target\n  target: 0.9\n")
    load_sweep(path)
    path.write_text("base: {}\n" + SEARCH + "  points: [{learner.lr: 1.0e-4}]\n  pruner: asha\n"
                    "scheduler: {max_concurrent: 2, max_retries: 1}\n")  # a search may set Tune's concurrency
    load_sweep(path)


def test_cli_plan_refuses_a_bad_file_with_exit_2_and_writes_nothing(tmp_path, fake_models):
    out = tmp_path / "out"
    path = write(tmp_path, f"run:\n  output_dir: {out}\n  steps: 5\n  steps: 6\n")
    proc = foresight("plan", str(path), *model_overrides(fake_models), check=False)
    assert proc.returncode == 2 and f"error: {path}: run.steps: duplicate key 'steps'" in proc.stderr, proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_unreachable_tracking_server_refused_before_anything_starts(tmp_path, fake_models, monkeypatch):
    import argparse
    import socket

    from orchestrator.cli import _load

    for key in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path, f"run:\n  output_dir: {tmp_path / 'out'}\ntracking:\n  uri: http://127.0.0.1:{port}\n")
    args = argparse.Namespace(config=str(path), overrides=model_overrides(fake_models), cluster=None)
    err = refused(lambda: _load(args))
    assert err.key == "tracking.uri" and "no MLflow tracking server answers" in err.reason
    assert not (tmp_path / "out").exists()


def test_exopd_at_lam_1_runs_vanilla_opds_step():
    """ExOPD with lam = 1 asks the teacher for nothing more and gives the learner vanilla's loss spec,
    so with the same seeds its run is vanilla's bit for bit; lam != 1 adds the reference's scores."""
    from orchestrator.trainer import OPDTrainer

    def trainer(*overrides: str) -> OPDTrainer:
        t = OPDTrainer.__new__(OPDTrainer)  # the properties read only the config
        t.cfg = load_config(None, ["loss.type=pg_reverse_kl", *overrides])
        return t

    vanilla, lam1 = trainer(), trainer("method.type=exopd", "method.lam=1.0")
    lam125 = trainer("method.type=exopd", "method.lam=1.25")
    assert lam1._wanted_scores == vanilla._wanted_scores and lam1._loss_spec == vanilla._loss_spec
    assert lam125._wanted_scores["ref"] and lam125._loss_spec["lam"] == 1.25


def test_off_policy_control_trains_without_importance_correction_by_default(fake_models):
    """`rollout.source: teacher`: weighting the teacher's tokens by min(pi_s / pi_teacher, 5) would pull
    the control back toward on-policy, so it is off unless set (and the plan says so); on-policy keeps it."""
    from orchestrator.trainer import OPDTrainer

    def spec(*overrides: str) -> dict:
        t = OPDTrainer.__new__(OPDTrainer)
        t.cfg = load_config(None, ["loss.type=pg_reverse_kl", *overrides])
        return t._loss_spec

    assert spec()["importance_correction"] is True
    assert spec("rollout.source=teacher")["importance_correction"] is False
    assert spec("rollout.source=teacher", "loss.importance_correction=true")["importance_correction"] is True
    assert spec("loss.importance_correction=false")["importance_correction"] is False
    plan = resolve(load_config(None, model_overrides(fake_models) + ["rollout.source=teacher"]), "x.yaml", cpus=2)
    assert any("importance correction off" in n for n in plan.notes)


def test_models_must_hold_prompt_plus_response_and_share_one_tokenizer(tmp_path, models):
    """Checked on the model folders before launch: a context shorter than the longest prompt +
    rollout.max_new_tokens (vLLM would refuse the engine), and a teacher whose tokenizer differs (the
    cross-tokenizer path for pg_reverse_kl, refused for a full-distribution loss)."""
    import json
    import shutil

    from core.modeling import build_tokenizer

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    shutil.copytree(models / "student", student)
    shutil.copytree(models / "teacher", teacher)
    overrides = [f"models.student={student}", f"models.teacher={teacher}", f"run.output_dir={tmp_path}"]
    context = json.loads((student / "config.json").read_text())["max_position_embeddings"]
    resolve(load_config(None, overrides + [f"rollout.max_new_tokens={context - 8}"]), "exp.yaml", cpus=8)  # 8 + 56 fits
    with pytest.raises(ConfigError) as err:
        resolve(load_config(None, overrides + [f"rollout.max_new_tokens={context - 7}"]), "exp.yaml", cpus=8)
    assert err.value.key == "rollout.max_new_tokens" and f"context of {context} tokens" in err.value.reason
    other = build_tokenizer()
    other.add_tokens(["<think>"])
    other.save_pretrained(teacher)
    with pytest.raises(ConfigError) as err:  # a full-distribution loss across tokenizers
        resolve(load_config(None, overrides + ["loss.type=full_reverse_kl"]), "exp.yaml", cpus=8)
    assert err.value.key == "loss.type" and "different tokenizer" in err.value.reason and "<think>" in err.value.reason
    assert resolve(load_config(None, overrides + ["loss.type=pg_reverse_kl"]), "exp.yaml", cpus=8).cross_tokenizer


def test_dry_run_checks_the_registry_context(fake_models):
    cfg = load_config(ROOT / "experiments" / "paper_1p5b_math.yaml", ["rollout.max_new_tokens=40000"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "paper.yaml", cluster=parse_cluster("1x8xH100-80GB"))
    assert err.value.key == "rollout.max_new_tokens" and "Qwen2.5" in err.value.reason
