"""One trial of a sweep or search as a Ray Tune trainable (run by orchestrator/scheduler.py).

`SweepSpec` turns a Tune config into the trial's (name, config, plan): a matrix sweep's config is
{"trial": name}; a search's is the sampled {dotted key: value} plus {"optuna_trial": number}, merged
into the base. The trial's placement group is an empty head bundle (the trainable, which only
drives the loop, asks for nothing) followed by the plan's bundles, so the group Tune reserves is
exactly `plan.bundles()` and the trial's actors are created in it at the plan's bundle indices.

`OPDTrial.step()` runs the OPD loop to its next evaluation and reports
`{step, accuracy, objective, steps_total, finished}` (Tune also sets `done` on a trial its scheduler
stops; `finished` means the loop ended). A retry is a new trainable that resumes from the trial's
own checkpoint into the same MLflow run; Tune checkpoints are not used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from core.config import ExperimentConfig
from orchestrator.plan import ResolvedPlan
from orchestrator.search import SearchConfig, objective_value, trial_config

TRIAL = "trial"
"""Matrix sweeps: the Tune config is {TRIAL: trial name}."""
NUMBER = "optuna_trial"
"""Searches: the Tune config is the sampled {dotted key: value} plus {NUMBER: Optuna's trial number}."""


@dataclass
class SweepSpec:
    """Everything a trial needs besides its Tune config; shipped to the trainables once."""

    name: str
    parent_run_id: str | None
    file: str
    trials: dict[str, tuple[ExperimentConfig, ResolvedPlan]] = field(default_factory=dict)
    base: dict | None = None
    search: SearchConfig | None = None
    resources: dict[str, float] | None = None
    pools: list = field(default_factory=list)
    """The sweep's shared teacher pools (`orchestrator/teacher_pool.py`)."""

    def trial(self, config: dict[str, Any]) -> tuple[str, ExperimentConfig, ResolvedPlan]:
        """Tune config -> (trial name, config, plan)."""
        if TRIAL in config:
            cfg, plan = self.trials[config[TRIAL]]
            return config[TRIAL], cfg, plan
        return self._search_trial(json.dumps(config, sort_keys=True))

    @functools.lru_cache(maxsize=256)
    def _search_trial(self, key: str) -> tuple[str, ExperimentConfig, ResolvedPlan]:
        from orchestrator.plan import resolve

        config = json.loads(key)
        assignment = {k: v for k, v in config.items() if k != NUMBER}
        from orchestrator.teacher_pool import bind

        cfg = trial_config(self.name, config[NUMBER], self.base, assignment, self.file)
        return cfg.run.name, cfg, bind(cfg, resolve(cfg, self.file, resources=self.resources), self.pools, self.name)

    def __hash__(self) -> int:  # the lru_cache key; one spec per sweep
        return id(self)

    def resources_of(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        """The trial's placement group: the trainable's empty bundle, then the plan's bundles."""
        return tune.PlacementGroupFactory([{}] + self.trial(config)[2].bundles(), strategy="PACK")


class OPDTrial(tune.Trainable):
    """One trial's OPD loop as a Tune trainable; `step()` = train to the next evaluation."""

    def setup(self, config: dict[str, Any], spec: SweepSpec) -> None:
        from ray.util import get_current_placement_group

        from actors.weights import write_pid
        from orchestrator.trainer import OPDTrainer

        self.name, cfg, plan = spec.trial(config)
        self.search, self.total, self.every = spec.search, cfg.run.steps, cfg.eval.every
        write_pid({"pid_dir": str(plan.run_dir.resolve() / "actors")}, "trial", 0)
        self.trainer = OPDTrainer(cfg, plan, resume=True, parent_run_id=spec.parent_run_id, show_progress=False,
                                  placement_group=get_current_placement_group())
        self.trainer.start()
        tracker = self.trainer.tracker
        self.history = {m.step: m.value for m in tracker.client.get_metric_history(tracker.run_id, "eval/accuracy")}
        """Every evaluation of this trial, including those before a resume (read back from MLflow)."""
        self.evals = self.trainer.evaluations()
        if spec.search is not None:
            tracker.set_tags({"optuna.trial": str(config[NUMBER]), "optuna.study": spec.name,
                              **{f"optuna.param.{k}": str(v) for k, v in config.items() if k != NUMBER}})

    def step(self) -> dict[str, Any]:
        for step, acc in self.evals:
            self.history[step] = acc
            if 0 < step < self.total:
                return self._result(step, done=False)
        return self._result(self.total, done=True)  # the loop ended: final checkpoint saved, run FINISHED

    def _result(self, step: int, done: bool) -> dict[str, Any]:
        history = sorted(self.history.items())
        out: dict[str, Any] = {"step": step, "steps_total": self.total, "done": done, "finished": done}
        if history:
            out["accuracy"] = history[-1][1]
            out["objective"] = objective_value(self.search, history, self.total, self.every) if self.search \
                else history[-1][1]
        return out

    def cleanup(self) -> None:
        """Stopped early (scheduler, Ctrl-C) or finished: end the loop (KILLED unless it finished),
        then remove the trial's actors."""
        if getattr(self, "trainer", None) is None:
            return
        self.evals.close()
        self.trainer.shutdown()
