"""Read a sweep (or a single run) from MLflow, through MLflow's client API only, so the same code
reads a local sqlite store and a running `mlflow server` (`--uri http://127.0.0.1:5000`).

Layout written by `foresight run`: experiment SWEEP holds a parent run named SWEEP and one child
run per trial (tag `mlflow.parentRunId`); trial params are the flattened config (`learner/lr`,
`method/type`, `run/seed`, `run/scale`), tags `method`, `scale`, `seed`, `pruned`. A plain
experiment run (no sweep) is a run named like the experiment with no children: it is its own
single trial. An experiment without a run of that name (e.g. a benchmark's) is read as a flat
list of trials with no parent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METRIC_PREFIXES = ("eval/", "timing/", "util/", "effopd/", "direction/", "geometry/", "route/")
"""Metric histories read per trial (train/* is not drawn: it would only add requests)."""
ACC = "eval/accuracy"


@dataclass
class Trial:
    run_id: str
    name: str
    status: str
    """MLflow status: RUNNING, FINISHED, FAILED, KILLED (pruned trials end KILLED with tag `pruned`)."""
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)
    """metric -> [(step, value, timestamp ms)] sorted by step (METRIC_PREFIXES only)."""
    metric_keys: list[str] = field(default_factory=list)
    """Every metric the run has logged (train/* included)."""
    label: str | None = None
    """The method with its distinguishing settings (e.g. `exopd lam=1.25`), set by the analysis."""
    metric: str = ACC
    """The accuracy the curves and the speed-up table use (`foresight dashboard --metric`)."""

    @property
    def method(self) -> str:
        return self.label or self.tags.get("method") or self.params.get("method/type") or "?"

    @property
    def seed(self) -> str:
        return self.tags.get("seed") or self.params.get("run/seed") or "0"

    @property
    def scale(self) -> str:
        return self.tags.get("scale") or self.params.get("run/scale") or "-"

    @property
    def pruned(self) -> bool:
        return self.tags.get("pruned") == "true"

    @property
    def state(self) -> str:
        """What a reader needs: running / finished / failed / pruned."""
        if self.pruned:
            return "pruned"
        return {"RUNNING": "running", "SCHEDULED": "queued", "FINISHED": "finished",
                "FAILED": "failed", "KILLED": "killed"}.get(self.status, self.status.lower())

    @property
    def total_steps(self) -> int | None:
        value = self.params.get("run/steps")
        return int(value) if value and value.isdigit() else None

    @property
    def last_step(self) -> int:
        """The last step with any metric logged (0 before the first training step)."""
        return max((h[-1][0] for h in self.history.values() if h), default=0)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, NaN values dropped."""
        pts = [(s, v) for s, v, _ in self.history.get(key, []) if not math.isnan(v)]
        return [s for s, _ in pts], [v for _, v in pts]


@dataclass
class Sweep:
    name: str
    uri: str
    experiment_id: str
    parent: Any | None
    """The parent MLflow run (mlflow.entities.Run), or None for a flat experiment."""
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)

    @property
    def is_sweep(self) -> bool:
        """False for a single experiment run (the parent is its own only trial) and a flat experiment."""
        return self.parent is not None and not any(t.run_id == self.parent.info.run_id for t in self.trials)


class NotFound(Exception):
    """No experiment or run to draw; the message says what was looked for and where."""


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def load_sweep(uri: str, sweep: str, experiment: str | None = None, metric: str = ACC) -> Sweep:
    """The parent run named `sweep` in `experiment` (default: the sweep's name) and its children,
    each with the metric histories the dashboard draws; `metric` is the target accuracy (an
    `eval/...` key, e.g. `eval/aime24/mean_at_32`)."""
    if not metric.startswith("eval/"):
        raise NotFound(f"--metric must be an eval/... metric, got '{metric}'")
    client = client_for(uri)
    exp_name = experiment or sweep
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        raise NotFound(f"no MLflow experiment '{exp_name}' at {uri}")
    eid = exp.experiment_id
    named = client.search_runs([eid], filter_string=f"attributes.run_name = '{_quote(sweep)}'",
                               order_by=["attributes.start_time DESC"], max_results=50)
    parent, children = None, []
    for run in named:
        kids = _search_all(client, eid, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        if kids:
            parent, children = run, kids
            break
    notes: list[str] = []
    if parent is None and named and "sweep" in named[0].data.tags:
        parent = named[0]  # a sweep's parent before its first trial started
        notes.append("no trial has started yet: re-render once the sweep runs")
    elif parent is None and named:
        parent, children = named[0], [named[0]]  # a single experiment run: its own only trial
    elif parent is None:
        children = [r for r in _search_all(client, eid, "") if "mlflow.parentRunId" not in r.data.tags]
        if not children:
            raise NotFound(f"experiment '{exp_name}' at {uri} has no runs")
        notes.append(f"no run named '{sweep}' in experiment '{exp_name}': showing its {len(children)} top-level "
                     "runs; the dashboard is not logged to MLflow (no parent run to hold it)")
    trials = [_trial(client, r) for r in children]
    for t in trials:
        t.metric = metric
    trials.sort(key=lambda t: (t.scale, t.method, _num(t.seed), t.name))
    return Sweep(sweep, uri, eid, parent, trials, notes)


def _search_all(client, eid: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([eid], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _trial(client, run) -> Trial:
    keys = [k for k in run.data.metrics if k.startswith(METRIC_PREFIXES)]
    history = {}
    for key in keys:
        pts = client.get_metric_history(run.info.run_id, key)
        history[key] = sorted(((m.step, m.value, m.timestamp) for m in pts), key=lambda p: (p[0], p[2]))
    tags = run.data.tags
    return Trial(run.info.run_id, tags.get("mlflow.runName", run.info.run_id), run.info.status,
                 dict(run.data.params), dict(tags), history, sorted(run.data.metrics))


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf
