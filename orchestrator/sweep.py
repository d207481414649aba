"""Sweeps: a base experiment plus a `matrix` of dotted keys, expanded into trials.

    sweep: demo                     # MLflow experiment and parent-run name
    base: {run: {steps: 200}, ...}  # required: an experiment config (see core/config.py)
    matrix:
      method.type: [vanilla, effopd]
      run.seed: [0, 1]
    exclude: [{method.type: vanilla, run.seed: 1}]   # drop matching combinations
    include: [{name: exopd15, method.type: exopd, method.lam: 1.5}]  # extra trials; `name` sets the suffix

Trials are the cartesian product of the matrix axes in file order, named deterministically
(`demo-method.type=effopd-run.seed=1` -> run.name `demo_effopd_s1`). Every trial config is
validated before the first one starts, and so is the file itself (`SweepFile`: its keys and their
types, exclude keys and values that exist in the matrix, distinct trial names). Ray Tune runs the
trials (orchestrator/scheduler.py), each as an MLflow child run of the sweep's parent run.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from core.config import (ConfigError, ExperimentConfig, _Strict, deep_merge, parse_overrides, read_yaml, trial_dict,
                         validate, validation_error)
from orchestrator.search import SearchConfig

log = logging.getLogger(__name__)
SWEEP_KEYS = {"sweep", "base", "matrix", "include", "exclude", "scheduler", "search"}
DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SchedulerOptions(_Strict):
    max_concurrent: int | None = Field(None, gt=0, le=1024)
    """Trials at once at most (None: as many as the cluster's CPUs and GPUs fit; 1024 is beyond any cluster)."""
    max_retries: int = Field(2, ge=0, le=100)
    """Retries of a failed trial (Tune's max_failures; each resumes from the trial's last checkpoint)."""
    teacher_replicas: int | None = Field(None, gt=0, le=1024)
    """Replicas of each shared teacher pool (trials with `teacher.shared: true`); None: sized by the
    plan (`orchestrator/teacher_pool.py::pool_replicas`)."""


class SweepFile(_Strict):
    """The sweep/search file itself; `base` is validated as an ExperimentConfig per trial."""

    sweep: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Sweep name: MLflow experiment, parent run and trial-name prefix (default: the file's stem)."""
    base: dict[str, Any]
    """The experiment config every trial starts from (required; `{}` for all defaults)."""
    matrix: dict[str, list[Any]] = {}
    """Dotted key -> values; trials are the cartesian product."""
    include: list[dict[str, Any]] = []
    """Extra trials, each a mapping of dotted key -> value (`name` sets the trial's suffix)."""
    exclude: list[dict[str, Any]] = []
    """Matrix combinations to drop: mappings of matrix key -> one of its values."""
    scheduler: SchedulerOptions = SchedulerOptions()
    search: SearchConfig | None = None
    """An Optuna search on Tune instead of matrix/include (orchestrator/search.py)."""


MISSING = {"base": "missing: a sweep file needs `base:`, the experiment config every trial starts from ({} for defaults)"}


def parse_sweep(data: dict[str, Any], path: str | Path) -> SweepFile:
    """Validate a sweep or search file's own keys; raises ConfigError naming file, key and reason."""
    try:
        sf = SweepFile.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, path, missing=MISSING) from None
    if sf.search is not None:
        for key in ("matrix", "include", "exclude"):
            if key in data:
                raise ConfigError(path, key, "not used by a search file (Optuna samples the trials)")
        return sf
    if not (sf.matrix or sf.include):
        raise ConfigError(path, "matrix", "must be a non-empty mapping of dotted key -> list of values (or give include)")
    for key, values in sf.matrix.items():
        _check_key(key, f"matrix.{key}", path)
        if key == "name":
            raise ConfigError(path, "matrix.name", "`name` labels include entries; it is not a config key")
        if not values:
            raise ConfigError(path, f"matrix.{key}", "must be a non-empty list of values")
        for i, v in enumerate(values):
            if v in values[:i]:
                raise ConfigError(path, f"matrix.{key}", f"value {v!r} listed twice (two trials would share a name)")
    for field_name, items in (("include", sf.include), ("exclude", sf.exclude)):
        for i, item in enumerate(items):
            if not item:
                raise ConfigError(path, f"{field_name}.{i}", "must be a non-empty mapping of dotted key -> value")
            for key, value in item.items():
                where = f"{field_name}.{i}.{key}"
                if field_name == "include" and key == "name":
                    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
                        raise ConfigError(path, where, f"must be a trial suffix of letters, digits, _ . - (got {value!r})")
                    continue
                _check_key(key, where, path)
                if field_name == "exclude" and key not in sf.matrix:
                    raise ConfigError(path, where, "not a matrix key: this exclude would never match")
                if field_name == "exclude" and value not in sf.matrix[key]:
                    raise ConfigError(path, where, f"{value!r} is not among matrix.{key}'s values: this exclude would never match")
    return sf


def _check_key(key: str, where: str, path: str | Path) -> None:
    if not DOTTED_KEY.match(key):
        raise ConfigError(path, where, "must be a dotted config key like learner.lr")


def scheduler_options(data: dict[str, Any], path: str | Path) -> SchedulerOptions:
    try:
        return SchedulerOptions.model_validate(data.get("scheduler", {}))
    except ValidationError as err:
        raise validation_error(err, path, prefix="scheduler") from None


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
    sf = parse_sweep(data, path)
    if sf.search is not None:
        raise ConfigError(path, "search", "a search file has no fixed trials (run it with `foresight run`)")
    name = sf.sweep or Path(path).stem
    matrix = sf.matrix
    base = deep_merge(sf.base, parse_overrides(overrides or []))
    assignments = [dict(zip(matrix.keys(), combo)) for combo in itertools.product(*matrix.values())] if matrix else []
    assignments = [a for a in assignments if not any(all(a.get(k) == v for k, v in ex.items()) for ex in sf.exclude)]
    assignments += [dict(i) for i in sf.include]
    if not assignments:
        raise ConfigError(path, "exclude", "drops every combination of the matrix: no trials left")
    n_matrix = len(assignments) - len(sf.include)
    trials: list[Trial] = []
    for i, assignment in enumerate(assignments):
        origin = "matrix" if i < n_matrix else f"include.{i - n_matrix}"
        label = assignment.pop("name", None)
        trial_name = f"{name}_{label}" if label else "_".join([name] + [_short(k, v) for k, v in assignment.items()])
        if any(t.name == trial_name for t in trials):
            raise ConfigError(path, origin, f"two trials are both named {trial_name} (they would share a run folder)")
        merged = trial_dict(base, assignment, trial_name, name, path)
        try:
            cfg = validate(merged, path)
        except ConfigError as err:
            key = next((f"{origin}.{k}" for k in assignment if err.key.startswith(k) or k.startswith(err.key)), err.key)
            raise ConfigError(path, key, f"{err.reason} (trial {trial_name})") from None
        trials.append(Trial(trial_name, assignment, cfg))
    return name, trials


def open_parent_run(sweep: str, plans: list) -> str:
    """The sweep's MLflow parent run (re-used when the sweep is re-run; RUNNING until the sweep ends):
    the trial list, the `sweep` tag, and a description pointing at the comparison views."""
    from dashboards.mlflow_ui import configure
    from orchestrator.tracking import MlflowLogger

    cfg, plan = plans[0]
    id_file = cfg.run.output_dir / f"{sweep}.parent_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    tracker = MlflowLogger(plan.tracking_uri, cfg.tracking.experiment, sweep, run_id=run_id,
                           artifact_root=cfg.run.output_dir / "mlartifacts")
    if run_id is None:
        cfg.run.output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(tracker.run_id)
        tracker.log_json([c.model_dump(mode="json") for c, _ in plans], "trials.json")
        tracker.set_tags({"sweep": sweep, "trials": str(len(plans))})
        exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        configure(tracker.client, exp_id, tracker.run_id, sweep, [], set(), f"{len(plans)} trials", True)
    return tracker.run_id


def close_parent_run(plans: list, run_id: str, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(plans[0][1].tracking_uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def ui_hint(plans: list) -> str:
    """Where to look: the store, and the UI URL of the experiment's runs (compare view)."""
    from mlflow.tracking import MlflowClient

    from dashboards.mlflow_ui import runs_path, ui_base, ui_command

    cfg, plan = plans[0]
    exp = MlflowClient(plan.tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
    lines = [f"mlflow: {plan.tracking_uri} (experiment '{cfg.tracking.experiment}')"]
    if exp is not None:
        command = ui_command(plan.tracking_uri)
        lines.append(f"  runs: {ui_base(plan.tracking_uri)}/{runs_path(exp.experiment_id)}"
                     + (f"   (serve it: {command})" if command else ""))
    return "\n".join(lines)
