"""Hyper-parameter search with Optuna: a sweep file with a `search` section instead of a matrix.

    sweep: lr_search
    base: {run: {steps: 100}, ...}
    search:
      params:
        learner.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
        method.type: {type: categorical, choices: [vanilla, effopd]}
      objective: final_accuracy        # or best_accuracy, steps_to_target (with target)
      n_trials: 8
      sampler: tpe                     # or random
      pruner: median                   # fed eval/accuracy at every evaluation; or none

The study lives in RDB storage (default `sqlite:///<run.output_dir>/<sweep>.optuna.db`), so a
re-run resumes it: completed and pruned trials count toward `n_trials`, trials left running by
a killed process are marked failed. Every trial is an MLflow child run of the sweep's parent.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config import MAX_SEED, ConfigError, _Strict, deep_merge, nest, validate, validation_error

log = logging.getLogger(__name__)


class SearchParam(_Strict):
    type: Literal["float", "int", "categorical"]
    """Distribution kind."""
    low: float | None = None
    """Lowest value (float/int; an integer for int)."""
    high: float | None = None
    """Highest value (float/int; an integer for int)."""
    log: bool = False
    """Sample on a log scale (float/int; needs low > 0)."""
    choices: list[Any] | None = Field(None, max_length=1000)
    """Values of a categorical parameter (distinct)."""

    @model_validator(mode="after")
    def _bounds(self) -> "SearchParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs non-empty choices")
            if any(c in self.choices[:i] for i, c in enumerate(self.choices)):
                raise ValueError("categorical choices must be distinct")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("low, high and log apply to float/int parameters, not categorical")
            return self
        if self.choices is not None:
            raise ValueError("choices apply to categorical parameters only")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("float/int parameters need low < high")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("int parameters need integer low and high")
        if self.log and self.low <= 0:
            raise ValueError("log-scale parameters need low > 0")
        return self


class SearchConfig(_Strict):
    params: dict[str, SearchParam] = Field(min_length=1, max_length=100)
    """Dotted config key -> distribution."""
    objective: Literal["final_accuracy", "best_accuracy", "steps_to_target"] = "final_accuracy"
    """What a trial returns: last or best eval/accuracy, or the first eval step reaching `target`."""
    target: float | None = Field(None, gt=0, le=1)
    """Accuracy target for steps_to_target."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: maximize accuracies, minimize steps_to_target."""
    n_trials: int = Field(8, gt=0, le=10_000)
    """Total trials of the study (a re-run only runs the missing ones; 10^4 full runs is past any budget)."""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna sampler: TPE or uniform random."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Sampler seed."""
    pruner: Literal["median", "none"] = "median"
    """Median pruner on intermediate eval/accuracy (after 2 complete trials and 1 evaluation)."""
    storage: str | None = Field(None, min_length=1)
    """Optuna RDB URL (default sqlite:///<run.output_dir>/<sweep>.optuna.db)."""

    @model_validator(mode="after")
    def _target(self) -> "SearchConfig":
        if self.objective == "steps_to_target" and self.target is None:
            raise ValueError("objective steps_to_target needs a target accuracy")
        if self.objective != "steps_to_target" and self.target is not None:
            raise ValueError(f"target is only used by objective steps_to_target (objective is {self.objective})")
        for key in self.params:
            if not all(part.isidentifier() for part in key.split(".")):
                raise ValueError(f"params: '{key}' is not a dotted config key like learner.lr")
        return self


def parse_search(raw: Any, file: str | Path) -> SearchConfig:
    from pydantic import ValidationError

    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, file, prefix="search") from None


def suggest(trial, key: str, p: SearchParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(key, p.choices)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(key, p.low, p.high, log=p.log)


def trial_config(name: str, number: int, base: dict, assignment: dict[str, Any], file: str | Path):
    merged = deep_merge(deep_merge(base, nest(assignment, file)), {"run": {"name": f"{name}_t{number:03d}"},
                                                                    "tracking": {"experiment": name}})
    return validate(merged, file)


def _values(p: SearchParam) -> list[Any]:
    """The values a parameter can take at its edges: low and high, or every choice."""
    if p.type == "categorical":
        return list(p.choices)
    return [int(p.low), int(p.high)] if p.type == "int" else [p.low, p.high]


def check_search_space(name: str, base: dict, search: SearchConfig, file: str | Path) -> None:
    """Validate the base with each parameter at its low and high (or every choice), the others at
    their low / first value, before anything starts."""
    first = {k: _values(p)[0] for k, p in search.params.items()}
    for key, p in search.params.items():
        for value in _values(p):
            try:
                trial_config(name, 0, base, {**first, key: value}, file)
            except ConfigError as err:
                where = next((f"search.params.{k}" for k in search.params
                              if err.key.startswith(k) or k.startswith(err.key + ".")), err.key)
                raise ConfigError(file, where, f"{err.reason} (at {key}={value!r})") from None


def objective_value(search: SearchConfig, history: list[tuple[int, float]], steps: int, every: int) -> float:
    accs = [a for _, a in history]
    if search.objective == "final_accuracy":
        return accs[-1]
    if search.objective == "best_accuracy":
        return max(accs)
    return float(next((s for s, a in history if a >= search.target), steps + every))


def run_study(name: str, base: dict, search: SearchConfig, file: str | Path, parent_run_id: str | None,
              cpus: float | None = None) -> Any:
    """Create or resume the study and run the missing trials one after another."""
    import optuna

    from orchestrator.plan import resolve
    from orchestrator.trainer import OPDTrainer

    base_cfg = validate(base, file)
    storage = search.storage or f"sqlite:///{(base_cfg.run.output_dir / f'{name}.optuna.db').resolve()}"
    base_cfg.run.output_dir.mkdir(parents=True, exist_ok=True)
    direction = search.direction or ("minimize" if search.objective == "steps_to_target" else "maximize")
    sampler = optuna.samplers.TPESampler(seed=search.seed) if search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=search.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if search.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=direction,
                                sampler=sampler, pruner=pruner)
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)  # left running by a killed process
    counted = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    remaining = max(0, search.n_trials - counted)
    log.info("study %s (%s): %d trials done, %d to run", name, storage, counted, remaining)

    def objective(trial) -> float:
        assignment = {k: suggest(trial, k, p) for k, p in search.params.items()}
        cfg = trial_config(name, trial.number, base, assignment, file)
        plan = resolve(cfg, file, cpus)
        history: list[tuple[int, float]] = []

        def on_eval(step: int, acc: float) -> bool:
            history.append((step, acc))
            if step == 0:
                return False
            trial.report(acc, step)
            return trial.should_prune()

        trainer = OPDTrainer(cfg, plan, resume=True, parent_run_id=parent_run_id, show_progress=False, on_eval=on_eval)
        try:
            trainer.run()
        finally:
            trainer.shutdown()
        trainer.tracker.set_tags({"optuna.trial": str(trial.number), "optuna.study": name,
                                  **{f"optuna.param.{k}": str(v) for k, v in assignment.items()}})
        if trainer.pruned:
            raise optuna.TrialPruned()
        value = objective_value(search, history, cfg.run.steps, cfg.eval.every)
        print(f"trial {trial.number}: {assignment} -> {search.objective} {value:.4g}", flush=True)
        return value if not math.isnan(value) else float("-inf")

    if remaining:
        study.optimize(objective, n_trials=remaining, catch=())
    best = study.best_trial if any(t.state == states.COMPLETE for t in study.trials) else None
    if best is not None:
        print(f"best trial {best.number}: {best.params} -> {best.value:.4g}")
    return study
