"""The Tune side of sweeps without a cluster: a trial's placement group is the plan's bundles after an
empty head bundle, a search's Tune config becomes the named trial config, the Optuna searcher numbers
its suggestions and records a trial stopped early as PRUNED, and a resumed study's sampler draws new
points, and a re-run of a finished sweep launches nothing. (Tune running real trials:
test_e2e_sweep.py, test_e2e_search.py, test_e2e_ray_job.py, test_e2e_simulated_gpu.py.)"""

from __future__ import annotations

import optuna

from conftest import model_overrides
from core.config import parse_overrides, validate
from orchestrator.plan import resolve
from orchestrator.search import SearchConfig, sampler
from orchestrator.trial import NUMBER, TRIAL, SweepSpec

SEARCH = SearchConfig.model_validate({"params": {"learner.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                                                 "method.type": {"type": "categorical", "choices": ["vanilla", "effopd"]}},
                                      "points": [{"learner.lr": 1e-4, "method.type": "effopd"}], "pruner": "asha"})
CPUS = {"CPU": 2.0}


def test_a_trials_placement_group_is_the_plans_bundles_after_an_empty_head(fake_models):
    cfg = validate({**parse_overrides(model_overrides(fake_models)), "run": {"name": "s_a"},
                    "learner": {"world_size": 2}})
    plan = resolve(cfg, "s.yaml", resources=CPUS)
    spec = SweepSpec("s", None, "s.yaml", trials={"s_a": (cfg, plan)})
    pgf = spec.resources_of({TRIAL: "s_a"})
    assert pgf.head_bundle_is_empty and pgf.bundles == [{k: float(v) for k, v in b.items() if v} for b in plan.bundles()]
    assert len(pgf.bundles) == 4  # rollout, teacher, 2 learner ranks: the trainable itself reserves nothing
    assert spec.trial({TRIAL: "s_a"})[0] == "s_a"


def test_a_search_config_becomes_the_numbered_trial(fake_models):
    base = parse_overrides(model_overrides(fake_models))
    spec = SweepSpec("lr", None, "lr.yaml", base=base, search=SEARCH, resources=CPUS)
    name, cfg, plan = spec.trial({"learner.lr": 3e-4, "method.type": "effopd", NUMBER: 7})
    assert name == "lr_t007" and cfg.run.name == name and cfg.tracking.experiment == "lr"
    assert cfg.learner.lr == 3e-4 and cfg.method.type == "effopd" and plan.run_dir.name == name
    assert spec.trial({NUMBER: 7, "method.type": "effopd", "learner.lr": 3e-4})[2] is plan  # resolved once


def test_the_searcher_numbers_trials_and_prunes_what_a_scheduler_stopped(tmp_path):
    from orchestrator.scheduler import _searcher

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    searcher = _searcher("s", SEARCH, storage, study)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == {"learner.lr": 1e-4, "method.type": "effopd", NUMBER: 0}  # the point comes first
    assert second[NUMBER] == 1 and 1e-5 <= second["learner.lr"] <= 1e-3
    searcher.on_trial_result("a", {"objective": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("a", {"objective": 0.3, "finished": True, "done": True})
    searcher.on_trial_result("b", {"objective": 0.1, "training_iteration": 1})
    searcher.on_trial_complete("b", {"objective": 0.1, "finished": False, "done": True})  # stopped by ASHA
    states = {t.number: (t.state, t.value) for t in optuna.load_study(study_name="s", storage=storage).trials}
    assert states == {0: (optuna.trial.TrialState.COMPLETE, 0.3), 1: (optuna.trial.TrialState.PRUNED, 0.1)}
    again = _searcher("s", SEARCH, storage, optuna.load_study(study_name="s", storage=storage))
    assert again.suggest("c")[NUMBER] == 2  # the point is in the study already: not enqueued twice


def test_a_resumed_study_samples_new_points():
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def draws(offset: int) -> list[float]:
        study = optuna.create_study(sampler=sampler(SEARCH.model_copy(update={"sampler": "random"}), offset))
        return [study.ask(space).params["x"] for _ in range(2)]

    assert draws(0) == draws(0) and draws(2) != draws(0)


def test_a_rerun_of_a_finished_sweep_launches_nothing(fake_models, tmp_path, capsys):
    import ray

    from orchestrator.scheduler import run_sweep
    from orchestrator.trainer import done_marker

    trials = {}
    for seed in (0, 1):
        cfg = validate({**parse_overrides(model_overrides(fake_models)), "run": {"name": f"s_s{seed}", "seed": seed,
                                                                               "output_dir": str(tmp_path)}})
        plan = resolve(cfg, "s.yaml", resources=CPUS)
        plan.run_dir.mkdir(parents=True)
        done_marker(plan.run_dir).write_text("{}")
        trials[cfg.run.name] = (cfg, plan)
    assert run_sweep(SweepSpec("s", None, "s.yaml", trials=trials)).ok
    assert capsys.readouterr().out.splitlines() == ["s_s0: already finished, skipped", "s_s1: already finished, skipped"]
    assert not ray.is_initialized() and not (tmp_path / "tune").exists()
