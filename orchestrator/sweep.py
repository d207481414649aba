"""Sweeps: a base experiment plus a `matrix` of dotted keys, expanded into trials.

    sweep: demo                     # MLflow experiment and parent-run name
    base: {run: {steps: 200}, ...}  # an experiment config (see orchestrator/config.py)
    matrix:
      method.type: [vanilla, effopd]
      run.seed: [0, 1]
    exclude: [{method.type: vanilla, run.seed: 1}]   # drop matching combinations
    include: [{name: exopd15, method.type: exopd, method.lam: 1.5}]  # extra trials; `name` sets the suffix

Trials are the cartesian product of the matrix axes in file order, named deterministically
(`demo-method.type=effopd-run.seed=1` -> run.name `demo_effopd_s1`). Every trial config is
validated before the first one starts. Trials run one after another in one Ray session, each
as an MLflow child run of the sweep's parent run.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.config import ConfigError, ExperimentConfig, deep_merge, parse_overrides, read_yaml, validate

log = logging.getLogger(__name__)
SWEEP_KEYS = {"sweep", "base", "matrix", "include", "exclude", "scheduler", "search"}


class SchedulerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent: int | None = Field(None, gt=0)
    """Trials at once at most (None: as many as the cluster's CPUs allow)."""
    max_retries: int = Field(2, ge=0)
    """Retries of a failed trial (each resumes from the trial's last checkpoint)."""


def scheduler_options(data: dict[str, Any], path: str | Path) -> SchedulerOptions:
    try:
        return SchedulerOptions.model_validate(data.get("scheduler") or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = "scheduler." + ".".join(str(p) for p in first["loc"])
        raise ConfigError(path, key, "unknown key" if first["type"] == "extra_forbidden" else first["msg"]) from None


@dataclass(frozen=True)
class Trial:
    name: str
    assignment: dict[str, Any]
    cfg: ExperimentConfig


def is_sweep(data: dict[str, Any]) -> bool:
    return bool({"matrix", "include", "search", "sweep"} & set(data))


def _short(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    if leaf == "type":
        return str(value)
    if leaf == "seed":
        return f"s{value}"
    return f"{leaf}{value}"


def expand(path: str | Path, overrides: list[str] | None = None) -> tuple[str, list[Trial]]:
    """Sweep file -> (sweep name, validated trials). Raises ConfigError naming file/key/reason."""
    data = read_yaml(path)
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], f"unknown key in a sweep file (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    name = str(data.get("sweep") or Path(path).stem)
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(path, "base", "must be a mapping (an experiment config)")
    matrix = data.get("matrix") or {}
    include, exclude = data.get("include") or [], data.get("exclude") or []
    if not isinstance(matrix, dict) or not (matrix or include):
        raise ConfigError(path, "matrix", "must be a non-empty mapping of dotted key -> list of values (or give include)")
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(path, f"matrix.{key}", "must be a non-empty list of values")
    for field_name, items in (("include", include), ("exclude", exclude)):
        if not isinstance(items, list) or not all(isinstance(i, dict) and i for i in items):
            raise ConfigError(path, field_name, "must be a list of non-empty mappings of dotted key -> value")
    base = deep_merge(base, parse_overrides(overrides or []))
    assignments = [dict(zip(matrix.keys(), combo)) for combo in itertools.product(*matrix.values())] if matrix else []
    assignments = [a for a in assignments if not any(all(a.get(k) == v for k, v in ex.items()) for ex in exclude)]
    assignments += [dict(i) for i in include]
    trials = []
    for assignment in assignments:
        label = assignment.pop("name", None)
        dotted = [f"{k}={_yaml_scalar(v)}" for k, v in assignment.items()]
        trial_name = f"{name}_{label}" if label else "_".join([name] + [_short(k, v) for k, v in assignment.items()])
        merged = deep_merge(deep_merge(base, parse_overrides(dotted)),
                            {"run": {"name": trial_name}, "tracking": {"experiment": name}})
        try:
            cfg = validate(merged, path)
        except ConfigError as err:
            key = next((f"matrix.{k}" for k in assignment if err.key.startswith(k) or k.startswith(err.key)), err.key)
            raise ConfigError(path, key, f"{err.reason} (trial {trial_name})") from None
        trials.append(Trial(trial_name, assignment, cfg))
    return name, trials


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
