"""Hyper-parameter search: a sweep file with a `search` section instead of a matrix, run by Ray Tune
with Optuna as the searcher (orchestrator/scheduler.py).

    sweep: lr_search
    base: {run: {steps: 100}, ...}
    search:
      params:
        learner.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
        method.type: {type: categorical, choices: [vanilla, effopd]}
      points: [{learner.lr: 1.0e-4, method.type: vanilla}]   # evaluated first (optional)
      objective: final_accuracy        # or best_accuracy, steps_to_target (with target)
      n_trials: 8
      sampler: tpe                     # or random
      pruner: asha                     # or median, none: Tune's scheduler fed every evaluation
    scheduler: {max_concurrent: 2, max_retries: 2}

The study lives in RDB storage (default `sqlite:///<run.output_dir>/<sweep>.optuna.db`), so a
re-run resumes it: completed and pruned trials count toward `n_trials`, trials left running by
a killed process are marked failed. Every trial is an MLflow child run of the sweep's parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import MAX_SEED, ConfigError, _Strict, trial_dict, validate, validation_error



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
    points: list[dict[str, Any]] = Field([], max_length=1000)
    """Assignments (dotted key -> value, one per parameter) evaluated before the sampler's own,
    e.g. the current defaults; a point the study already holds is not run again."""
    pruner: Literal["median", "asha", "none"] = "median"
    """Tune's scheduler, fed test accuracy at every evaluation: `median` stops a trial below the
    median of the others at the same step (after 2 trials have reported), `asha` (asynchronous
    successive halving) keeps the top 1/reduction_factor at steps eval.every x reduction_factor^k."""
    reduction_factor: int = Field(2, ge=2, le=16)
    """ASHA: the share of trials that continue at each rung is 1/reduction_factor."""
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
        for i, point in enumerate(self.points):
            if set(point) != set(self.params):
                raise ValueError(f"points.{i}: needs exactly the params' keys {sorted(self.params)} (got {sorted(point)})")
            for key, value in point.items():
                if not _contains(self.params[key], value):
                    raise ValueError(f"points.{i}.{key}: {value!r} is outside the parameter's distribution")
        return self

    def direction_of(self) -> Literal["maximize", "minimize"]:
        return self.direction or ("minimize" if self.objective == "steps_to_target" else "maximize")


def _contains(p: SearchParam, value: Any) -> bool:
    if p.type == "categorical":
        return value in p.choices
    if p.type == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high


def parse_search(raw: Any, file: str | Path) -> SearchConfig:
    from pydantic import ValidationError

    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, file, prefix="search") from None


def distributions(search: SearchConfig) -> dict[str, Any]:
    """The search space as Optuna distributions (what Tune's OptunaSearch samples from)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, p in search.params.items():
        if p.type == "categorical":
            out[key] = CategoricalDistribution(p.choices)
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def sampler(search: SearchConfig, trials_so_far: int = 0):
    """The study's sampler, seeded with `seed + trials so far`: a resumed study draws new points
    (the same seed again would repeat the first run's draws) and stays reproducible."""
    import optuna

    seed = (search.seed + trials_so_far) % (MAX_SEED + 1)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_config(name: str, number: int, base: dict, assignment: dict[str, Any], file: str | Path):
    return validate(trial_dict(base, assignment, f"{name}_t{number:03d}", name, file), file)


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
    for i, point in enumerate(search.points):
        try:
            trial_config(name, 0, base, point, file)
        except ConfigError as err:
            raise ConfigError(file, f"search.points.{i}", err.reason) from None


def objective_value(search: SearchConfig, history: list[tuple[int, float]], steps: int, every: int) -> float:
    accs = [a for _, a in history]
    if search.objective == "final_accuracy":
        return accs[-1]
    if search.objective == "best_accuracy":
        return max(accs)
    return float(next((s for s, a in history if a >= search.target), steps + every))
