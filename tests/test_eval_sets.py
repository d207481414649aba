"""Named evaluation sets (`eval.sets`, issue 14 item 5): greedy accuracy, mean@k and pass@k at
temperature T, scored by a rollout worker (plain Python here; a Ray actor in a run), and a tiny run
through `foresight run` that logs them to MLflow. Data: the embedded addition problems written as a
plain jsonl file, so the shipped models score them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, foresight, run_overrides
from orchestrator.config import ConfigError, load_config
from orchestrator.task import build_task

MODELS = ROOT / "models" / "addition"


def write_addition(path: Path, split: str, n: int) -> Path:
    from orchestrator.config import AdditionTask

    task = build_task(AdditionTask())
    rows = [{"prompt": e.prompt, "answer": e.answer} for e in getattr(task, split)[:n]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def overrides(tmp_path: Path, k: int = 4, temperature: float = 1.0) -> list[str]:
    train, test = write_addition(tmp_path / "train.jsonl", "train", 200), write_addition(tmp_path / "test.jsonl", "test", 40)
    return [f"models.student={MODELS / 'student'}", f"models.teacher={MODELS / 'teacher'}", "task.type=jsonl",
            f"task.train_path={train}", f"task.test_path={test}", "task.reward=exact",
            f"eval.sets={{held: {{path: {test}, k: {k}, temperature: {temperature}}}}}"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from actors.rollout import RolloutWorker
    from orchestrator.trainer import actor_config

    tmp = tmp_path_factory.mktemp("evalsets")
    cfg = load_config(None, overrides(tmp) + [f"run.output_dir={tmp}"])
    return RolloutWorker(actor_config(cfg)), cfg


def test_greedy_accuracy_and_near_greedy_samples_agree(worker):
    """The set's greedy accuracy equals the task's greedy accuracy on the same prompts; at T = 1e-4
    every sample is the argmax, so mean@k = pass@k = greedy accuracy exactly."""
    from orchestrator.modeling import greedy_accuracy

    w, cfg = worker
    examples = w.task.test[:40]
    want = greedy_accuracy(w.model, w.tokenizer, examples, w.task.reward, cfg.rollout.max_new_tokens)
    got = w.eval_set("held", list(range(40)), None, 0)
    assert got["count"] == 40 and got["accuracy"] / 40 == pytest.approx(want)
    w.cfg["eval_sets"]["held"] = {**w.cfg["eval_sets"]["held"], "temperature": 1e-4}
    cold = w.eval_set("held", list(range(40)), None, 0)
    assert cold["mean_at_4"] == cold["pass_at_4"] == cold["accuracy"]
    w.cfg["eval_sets"]["held"] = {**w.cfg["eval_sets"]["held"], "temperature": 1.0}


def test_mean_and_pass_at_k_at_temperature_one(worker):
    """T = 1: pass@k >= mean@k, each in [0, 1]; the samples differ from greedy (the student is at ~0.33,
    so some prompts have both right and wrong samples); the same call draws the same samples."""
    w, _ = worker
    a = w.eval_set("held", list(range(40)), None, 5)
    assert a == w.eval_set("held", list(range(40)), None, 5)  # seeded by (run seed, set, step, first prompt)
    assert 0 <= a["mean_at_4"] <= a["pass_at_4"] <= 40 and a["mean_at_4"] < a["pass_at_4"]
    assert a != w.eval_set("held", list(range(40)), None, 6)  # another step, other samples


def test_mean_over_workers_and_config_errors(tmp_path):
    from actors.evalsets import mean_over

    assert mean_over([{"count": 3.0, "mean_at_4": 1.5, "pass_at_4": 2.0}, {"count": 1.0, "mean_at_4": 0.5, "pass_at_4": 1.0}]) == \
        {"mean_at_4": 0.5, "pass_at_4": 0.75}
    assert mean_over([{"count": 0.0}]) == {}
    with pytest.raises(ConfigError, match="eval.sets.*file task"):
        load_config(None, [f"eval.sets={{x: {{path: {tmp_path}/a.jsonl}}}}"])
    with pytest.raises(ConfigError, match="scores nothing"):
        load_config(None, overrides(tmp_path)[:-1] + [f"eval.sets={{x: {{path: {tmp_path}/test.jsonl, greedy: false}}}}"])


@pytest.mark.e2e
def test_run_logs_eval_sets_to_mlflow(tmp_path):
    """`foresight run` with a named set: eval/<set>/accuracy, mean_at_4 and pass_at_4 at steps 0 and 2, the
    set's size in the params; `foresight dashboard --metric` takes the set's mean_at_4 as its target."""
    from mlflow.tracking import MlflowClient

    args = overrides(tmp_path) + ["run.steps=2", "eval.every=2", "learner.world_size=1", "rollout.batch_prompts=16",
                                  "geometry.every=0", "checkpoint.every=0", "run.name=sets"]
    foresight("run", str(ROOT / "experiments" / "smoke.yaml"), *args, *run_overrides(MODELS, tmp_path)[2:])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    for key in ("eval/held/accuracy", "eval/held/mean_at_4", "eval/held/pass_at_4"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 2], key
    assert run.data.params["data/eval_held_prompts"] == "40" and run.data.params["data/overlong_dropped_train"] == "0"
    dash = foresight("dashboard", "sets", "--experiment", "smoke", "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--out", str(tmp_path / "dash"), "--metric", "eval/held/mean_at_4")
    assert "target metric: eval/held/mean_at_4" in dash.stdout
