"""Sweeps: a base experiment plus a `matrix` of dotted keys, expanded into trials.

    sweep: demo                     # MLflow experiment and parent-run name
    base: {run: {steps: 200}, ...}  # an experiment config (see orchestrator/config.py)
    matrix:
      method.type: [vanilla, effopd]
      run.seed: [0, 1]

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

from orchestrator.config import ConfigError, ExperimentConfig, deep_merge, parse_overrides, read_yaml, validate

log = logging.getLogger(__name__)
SWEEP_KEYS = {"sweep", "base", "matrix"}


@dataclass(frozen=True)
class Trial:
    name: str
    assignment: dict[str, Any]
    cfg: ExperimentConfig


def is_sweep(data: dict[str, Any]) -> bool:
    return "matrix" in data or "sweep" in data


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
    if not isinstance(matrix, dict) or not matrix:
        raise ConfigError(path, "matrix", "must be a non-empty mapping of dotted key -> list of values")
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(path, f"matrix.{key}", "must be a non-empty list of values")
    base = deep_merge(base, parse_overrides(overrides or []))
    trials = []
    for combo in itertools.product(*matrix.values()):
        assignment = dict(zip(matrix.keys(), combo))
        dotted = [f"{k}={_yaml_scalar(v)}" for k, v in assignment.items()]
        trial_name = "_".join([name] + [_short(k, v) for k, v in assignment.items()])
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
