"""Sweeps and searches on Ray Tune: every trial is a Tune trial of `OPDTrial`.

- Trials: `OPDTrial` (orchestrator/trial.py) in a placement group of the plan's bundles; Tune
  starts a trial when its group fits the cluster, at most `scheduler.max_concurrent` at once. A
  trial that a search's scheduler (ASHA, median stopping) stops at an evaluation ends KILLED in
  MLflow and is tagged `pruned`.
- Retries: `FailureConfig(max_failures=scheduler.max_retries)`. A retry is a new trainable that
  resumes from the trial's own checkpoint (`<run_dir>/checkpoints`) into the same MLflow child run.
- Re-runs: the Tune experiment lives at `<run.output_dir>/tune/<sweep>`. Re-running the same
  trials restores it (`Tuner.restore(resume_errored=True)`): finished trials are not run again,
  unfinished and failed ones resume from their checkpoints. A sweep file whose trials changed
  starts a new Tune experiment (the old folder is kept, renamed) without the trials that already
  finished (`<run_dir>/done.json`).
- Searches: `OptunaSearch` over the study in RDB storage (`search.storage`), so a re-run with a
  larger `n_trials` continues the same study; trials left running by a killed process are marked
  failed and re-sampled.
- Ctrl-C, or SIGTERM (what `ray job stop` sends): Tune's interrupt, which stops the trials and
  removes their actors and placement groups, then saves the experiment for the re-run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from core.config import ExperimentConfig
from orchestrator.plan import ResolvedPlan
from orchestrator.progress import ProgressBoard
from orchestrator.search import SearchConfig, distributions, sampler
from orchestrator.trial import NUMBER, TRIAL, OPDTrial, SweepSpec

log = logging.getLogger(__name__)


class NumberedOptunaSearch(OptunaSearch):
    """Tune's OptunaSearch with two additions: each suggestion carries Optuna's trial number (it
    names the trial's run folder and MLflow run), and a trial a scheduler stopped early is told to
    the study as PRUNED instead of COMPLETE with a partial objective. Uses OptunaSearch's
    `_ot_trials`, `_ot_study` and `_completed_trials` (ray is pinned in pyproject.toml)."""

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        return None if params is None else {**params, NUMBER: self._ot_trials[trial_id].number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if error or not result or result.get("finished") or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


class SweepLog(tune.Callback):
    """What the sweep prints on the driver (status line, one progress line per running trial,
    retries, results) and the MLflow tag of a trial stopped early."""

    def __init__(self, spec: SweepSpec, max_retries: int) -> None:
        self.spec, self.max_retries = spec, max_retries
        self.board: ProgressBoard | None = None
        self.last = ""
        self.released: set[str] = set()

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; the board holds a stream
        return {**self.__dict__, "board": None, "last": ""}

    def _say(self, text: str, result: bool = False) -> None:
        """A status line on stderr, or a result line (done, failed, stopped early, retried) on stdout."""
        self.board = self.board or ProgressBoard()
        self.board.message(text, sys.stdout if result else None)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s started", self._name(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {self._name(trial)} failed ({_reason(trial)}); retrying from its last checkpoint "
                  f"(retry {trial.num_failures} of {self.max_retries})", result=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"FAILED: {self._name(trial)}: {_reason(trial)} (after {trial.num_failures} attempts)", result=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result, name = trial.last_result or {}, self._name(trial)
        acc = result.get("accuracy", float("nan"))
        if result.get("finished"):
            extra = f" ({self.spec.search.objective} {result.get('objective', float('nan')):.4g})" if self.spec.search else ""
            self._say(f"done: {name} final test accuracy {acc:.3f}{extra}", result=True)
            return
        step = result.get("step", 0)
        self._say(f"stopped early: {name} at step {step} (test accuracy {acc:.3f})", result=True)
        _tag_pruned(self.spec.trial(trial.config)[2], step)

    def on_step_end(self, iteration, trials, **info) -> None:
        count = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "RUNNING", "PENDING", "ERROR")}
        status = (f"trials: {count['TERMINATED']} done, {count['RUNNING']} running, {count['PENDING']} queued, "
                  f"{count['ERROR']} failed (of {len(trials)})")
        if status != self.last:
            self._say(status)
            self.last = status
        self.board = self.board or ProgressBoard()
        self.board.show({self._name(t): self.spec.trial(t.config)[2].run_dir for t in trials if t.status == "RUNNING"})
        self._release_pools(trials)

    def _release_pools(self, trials) -> None:
        """Stop a shared teacher pool once every trial it serves has ended (a matrix sweep's trials are
        known up front; a search's pool serves trials still to be sampled and lives to the end)."""
        if self.spec.search is not None or not self.spec.pools:
            return
        from orchestrator import teacher_pool
        from orchestrator.trainer import done_marker

        ended = {self._name(t) for t in trials if t.status in ("TERMINATED", "ERROR")}
        ended |= {n for n, (_, plan) in self.spec.trials.items() if done_marker(plan.run_dir).is_file()}
        for pool in self.spec.pools:
            if pool.name not in self.released and set(pool.trials) <= ended:
                self.released.add(pool.name)
                if teacher_pool.stop(pool):
                    self._say(f"teacher pool {pool.name} stopped (its {len(pool.trials)} trial(s) ended)", result=True)

    def _name(self, trial) -> str:
        return self.spec.trial(trial.config)[0]


def _reason(trial) -> str:
    text = str(trial.get_error() or "").strip()
    return text.splitlines()[-1][:300] if text else "unknown error"


def _tag_pruned(plan: ResolvedPlan, step: int) -> None:
    from mlflow.tracking import MlflowClient

    from orchestrator.checkpoint import run_id_file

    id_file = run_id_file(plan.run_dir)
    if id_file.is_file():
        client = MlflowClient(plan.tracking_uri)
        run_id = id_file.read_text().strip()
        client.set_tag(run_id, "pruned", "true")
        client.set_tag(run_id, "pruned_at_step", str(step))


@dataclass
class SweepResult:
    ok: bool
    """Every trial finished or was stopped early by the search's scheduler; none failed."""


def _trainable(spec: SweepSpec):
    return tune.with_resources(tune.with_parameters(OPDTrial, spec=spec), resources=spec.resources_of)


def _run_config(spec: SweepSpec, storage: Path, max_retries: int, name: str | None = None) -> tune.RunConfig:
    return tune.RunConfig(name=name or spec.name, storage_path=str(storage.resolve()),
                          failure_config=tune.FailureConfig(max_failures=max_retries),
                          checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),  # trials keep theirs in run_dir
                          callbacks=[SweepLog(spec, max_retries)], verbose=1)


def _fit(tuner: tune.Tuner) -> SweepResult:
    """Tuner.fit with SIGTERM (`ray job stop`) handled as Ctrl-C; ok = every trial ended well."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials keep the job's working directory (relative paths)
    stop = {"requested": False}

    def on_term(*_: Any) -> None:
        stop["requested"] = True
        signal.raise_signal(signal.SIGINT)  # Tune's own handler: stop trials, remove actors and groups

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        grid = tuner.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stop["requested"] or grid.num_terminated + grid.num_errors < len(grid):  # Ctrl-C / SIGTERM
        raise KeyboardInterrupt
    return SweepResult(ok=not grid.errors)


def run_sweep(spec: SweepSpec, *, max_retries: int = 2, max_concurrent: int | None = None) -> SweepResult:
    """Run a matrix sweep's trials as one Tune experiment (restored when it already exists)."""
    from orchestrator.trainer import done_marker

    skipped = [n for n, (_, plan) in spec.trials.items() if done_marker(plan.run_dir).is_file()]
    for name in skipped:
        print(f"{name}: already finished, skipped", flush=True)
    if len(skipped) == len(spec.trials):
        return SweepResult(ok=True)
    cfg0 = next(iter(spec.trials.values()))[0]
    storage = cfg0.run.output_dir / "tune"
    path = storage / spec.name
    fingerprint = json.dumps({n: c.model_dump(mode="json") for n, (c, _) in spec.trials.items()}, sort_keys=True)
    marker = path / "foresight_trials.json"
    if tune.Tuner.can_restore(str(path.resolve())) and marker.is_file() and marker.read_text() == fingerprint:
        log.info("restoring the Tune experiment %s (finished trials are not run again)", path)
        tuner = tune.Tuner.restore(str(path.resolve()), _trainable(spec), resume_unfinished=True, resume_errored=True)
    else:
        if path.exists():
            aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("the sweep's trials changed: new Tune experiment (the previous one is kept at %s)", aside)
            shutil.move(str(path), str(aside))
        todo = [n for n in spec.trials if n not in skipped]
        tuner = tune.Tuner(_trainable(spec), param_space={TRIAL: tune.grid_search(todo)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                                       trial_name_creator=lambda t: t.config[TRIAL],
                                                       trial_dirname_creator=lambda t: t.config[TRIAL]),
                           run_config=_run_config(spec, storage, max_retries))
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
    return _fit(tuner)


def run_search(spec: SweepSpec, *, max_retries: int = 2, max_concurrent: int | None = None) -> SweepResult:
    """Run the study's missing trials (n_trials minus those completed or pruned) as a Tune experiment."""
    import optuna

    from core.config import validate

    search, base = spec.search, validate(spec.base, spec.file)
    base.run.output_dir.mkdir(parents=True, exist_ok=True)
    url = search.storage or f"sqlite:///{(base.run.output_dir / f'{spec.name}.optuna.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                direction=search.direction_of())
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)  # left running by a killed process
    counted = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    remaining = max(0, search.n_trials - counted)
    log.info("study %s (%s): %d trials done, %d to run", spec.name, url, counted, remaining)
    result = SweepResult(ok=True)
    if remaining:
        tuner = tune.Tuner(_trainable(spec), tune_config=tune.TuneConfig(
            search_alg=_searcher(spec.name, search, storage, study), scheduler=_stopper(search, base), num_samples=remaining,
            max_concurrent_trials=max_concurrent, trial_name_creator=lambda t: spec.trial(t.config)[0],
            trial_dirname_creator=lambda t: spec.trial(t.config)[0]),
            run_config=_run_config(spec, base.run.output_dir / "tune" / spec.name, max_retries,
                                   name=time.strftime("%Y%m%d-%H%M%S")))
        result = _fit(tuner)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    if any(t.state == states.COMPLETE for t in study.trials):
        best = study.best_trial
        print(f"best trial {best.number}: {best.params} -> {search.objective} {best.value:.4g}", flush=True)
    return result


def _searcher(name: str, search: SearchConfig, storage: Any, study: Any) -> NumberedOptunaSearch:
    """OptunaSearch on the study (its `points` not yet in it first), sampler reseeded past its trials."""
    seen = [t.params for t in study.trials]
    return NumberedOptunaSearch(space=distributions(search), metric="objective",
                                mode="max" if search.direction_of() == "maximize" else "min",
                                sampler=sampler(search, len(seen)), study_name=name, storage=storage,
                                points_to_evaluate=[p for p in search.points if p not in seen] or None)


def _stopper(search: SearchConfig, base: ExperimentConfig):
    """Tune's trial scheduler for `search.pruner`, on test accuracy at each evaluation step."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if search.pruner == "asha":
        return ASHAScheduler(time_attr="step", metric="accuracy", mode="max", max_t=base.run.steps,
                             grace_period=base.eval.every, reduction_factor=search.reduction_factor)
    if search.pruner == "median":
        return MedianStoppingRule(time_attr="step", metric="accuracy", mode="max", grace_period=base.eval.every,
                                  min_samples_required=2)
    return FIFOScheduler()
