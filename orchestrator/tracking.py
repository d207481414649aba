"""Metric logging: a small protocol with an MLflow implementation.

Default store: `sqlite:///<run.output_dir>/mlflow.db` with artifacts under
`<run.output_dir>/mlartifacts`; `$MLFLOW_TRACKING_URI` or `tracking.uri` override it.
Open the UI with `mlflow ui --backend-store-uri <uri>`.

A resumed run re-opens the same MLflow run. Steps it already logged (the process died after
logging but before its next checkpoint) are not logged again: `log` drops metrics for steps at
or below the last step found in the store, so the history has no duplicates.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

STEP_KEY = "timing/step"


class MetricLogger(Protocol):
    run_id: str

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def resolve_uri(configured: str | None, output_dir: Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def sanitize(key: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space / only."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


class MlflowLogger:
    """Logs to one MLflow run (created, or re-opened by id on resume)."""

    run_id: str
    client: Any
    last_logged_step: int

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 artifact_root: Path | None = None, parent_run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is None:
            tags = {"mlflow.runName": run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id
            self.last_logged_step = -1
        else:
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, STEP_KEY)
            self.last_logged_step = max((m.step for m in history), default=-1)
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log all metrics of one step in one batch (skipped if the step is already stored)."""
        from mlflow.entities import Metric

        if step <= self.last_logged_step and STEP_KEY in metrics:
            return
        now = int(time.time() * 1000)
        batch = [Metric(sanitize(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])
        if STEP_KEY in metrics:
            self.last_logged_step = step

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        items = [Param(sanitize(k), str(v)[:6000]) for k, v in params.items() if sanitize(k) not in have]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_json(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2, default=_json_default), name)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
