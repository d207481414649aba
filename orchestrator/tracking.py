"""Metric logging: a small protocol with an MLflow implementation.

Default store: `sqlite:///<run.output_dir>/mlflow.db` with artifacts under
`<run.output_dir>/mlartifacts`; `$MLFLOW_TRACKING_URI` or `tracking.uri` override it.
Open the UI with `mlflow ui --backend-store-uri <uri>`.

A resumed run re-opens the same MLflow run. Steps it already logged (the process died after
logging but before its next checkpoint) are not logged again: `log` drops metrics for steps at
or below the last step found in the store, so the history has no duplicates.

Outages: `check_tracking` refuses a store that cannot be reached before anything launches (exit 2);
during a run a failing store never stops training: `MlflowLogger` retries, then buffers and
replays in order (see its docstring).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import math
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol
from urllib.parse import unquote, urlparse

STEP_KEY = "timing/step"
log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- reachability
def check_tracking(uris: Iterable[str], file: str | Path | None, timeout: float = 5.0) -> None:
    """Refuse a tracking store the run could not write to, before anything launches:
    http(s) servers must answer the REST API within `timeout` seconds; sqlite and file stores need
    a writable (or creatable) folder. Other schemes (databricks, postgresql, ...) are not probed.
    Raises ConfigError(file, "tracking.uri", reason); creates nothing."""
    from core.config import ConfigError

    for uri in dict.fromkeys(uris):
        reason = _unreachable(uri, timeout)
        if reason:
            raise ConfigError(file, "tracking.uri", reason)


def _unreachable(uri: str, timeout: float) -> str | None:
    """Why `uri` cannot be used, or None."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return _http_problem(uri, timeout)
    if parsed.scheme == "sqlite":
        db = uri.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
        if db in ("", ":memory:"):
            return None
        return _folder_problem(Path(db), uri, database=True)
    if parsed.scheme == "file":
        return _folder_problem(Path(unquote(parsed.path)), uri, database=False)
    if parsed.scheme == "":
        return _folder_problem(Path(uri), uri, database=False)
    return None


def _http_problem(uri: str, timeout: float) -> str | None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    context = None
    if uri.startswith("https"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as MLflow does
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return (f"the MLflow server at {uri} refused the request (HTTP {err.code}); set MLFLOW_TRACKING_TOKEN or "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        if err.code == 404:
            return f"{uri} answers, but not as an MLflow tracking server (HTTP 404 for /api/2.0/mlflow/experiments/search)"
        return f"the MLflow server at {uri} answers HTTP {err.code} ({err.reason})"
    except (urllib.error.URLError, OSError, ValueError) as err:
        why = getattr(err, "reason", None) or err
        return (f"no MLflow tracking server answers at {uri} within {timeout:g} s ({why}); start it "
                "(`mlflow server --host ... --port ...`) or point tracking.uri (or $MLFLOW_TRACKING_URI) at one")


def _folder_problem(path: Path, uri: str, database: bool) -> str | None:
    """A store at `path` (a database file, or a store folder) must be writable or creatable."""
    path = path.expanduser().absolute()
    if database and path.exists() and (not path.is_file() or not os.access(path, os.W_OK)):
        return f"{uri}: {path} is not a writable database file"
    if not database and path.exists():
        return None if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else f"{uri}: {path} is not a writable folder"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"{uri}: cannot create the store under {folder} (not a writable folder)"
    return None


# ----------------------------------------------------------------------------- logger
# MLflow errors that say the request itself is wrong: retrying or buffering cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "INVALID_STATE"}


class MlflowLogger:
    """Logs to one MLflow run (created, or re-opened by id on resume).

    Outages: a call to the store that fails is retried `retries` times, `backoff_s` x 1, 2, 4, ...
    apart. If it still fails, the store is taken as down: the call (metrics, params, tags or text)
    stays queued, a warning is logged once, and training goes on. Later calls queue behind it, in
    order; the queue is replayed on the next call once `retry_s` has passed (doubling up to
    `max_retry_s` while the store stays down), and at `close()`. At most `max_buffered` entries
    are kept (the oldest are dropped, with a warning). Requests the store rejects as invalid
    (`PERMANENT_ERRORS`) are raised, not buffered. For http(s) stores MLflow's own per-request
    retries are shortened ($MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, $MLFLOW_HTTP_REQUEST_TIMEOUT=30
    unless set) so an outage stalls a step for seconds, not minutes."""

    run_id: str
    client: Any
    uri: str
    last_logged_step: int
    """Highest step whose metrics (with STEP_KEY) were accepted: stored, or queued for the store."""

    # outage handling (class defaults; tests shorten them per instance)
    retries: int = 3
    backoff_s: float = 1.0
    retry_s: float = 30.0
    max_retry_s: float = 300.0
    max_buffered: int = 200_000
    _queue: deque
    """Pending entries in call order: mlflow Metric objects, or zero-argument calls."""
    _down_since: float | None = None
    _next_try: float = 0.0
    _wait_s: float = 0.0
    _dropped: int = 0

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 artifact_root: Path | None = None, parent_run_id: str | None = None, client: Any = None) -> None:
        if client is None:
            from mlflow.tracking import MlflowClient

            if uri.startswith(("http://", "https://")):
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            client = MlflowClient(tracking_uri=uri)
        self.client = client
        self.uri = uri
        self._queue = deque()
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
        self._submit([Metric(sanitize(k), float(v), now, step) for k, v in metrics.items() if v is not None])
        if STEP_KEY in metrics:
            self.last_logged_step = step

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit([functools.partial(self._log_params_now, params)])

    def _log_params_now(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        items = [Param(sanitize(k), str(v)[:6000]) for k, v in params.items() if sanitize(k) not in have]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit([functools.partial(self.client.set_tag, self.run_id, k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, name: str) -> None:
        self._submit([functools.partial(self.client.log_text, self.run_id, text, name)])

    def log_json(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2, default=_json_default), name)

    def close(self, status: str = "FINISHED") -> None:
        """Replay whatever an outage left queued, then mark the run terminated. Never raises for an
        outage (the run's work is done); what could not be logged is reported as an error."""
        self._submit([functools.partial(self.client.set_terminated, self.run_id, status=status)], force=True)
        if self._queue:
            metrics = sum(1 for e in self._queue if not callable(e))
            log.error("MLflow tracking at %s is still unreachable at close: %d metrics and %d other calls (run "
                      "status %s) were not logged", self.uri, metrics, len(self._queue) - metrics, status)

    # ------------------------------------------------------------------ outages
    def _submit(self, entries: list, force: bool = False) -> None:
        """Queue entries behind anything pending and replay the queue (unless the store is down and
        its next try is not due)."""
        self._queue.extend(entries)
        overflow = len(self._queue) - self.max_buffered
        if overflow > 0:
            for _ in range(overflow):
                self._queue.popleft()
            if not self._dropped:
                log.warning("MLflow outage: more than %d entries buffered; dropping the oldest", self.max_buffered)
            self._dropped += overflow
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return
        self._flush(retries=self.retries if self._down_since is None or force else 1)

    def _flush(self, retries: int) -> None:
        while self._queue:
            head = self._queue[0]
            if callable(head):
                n, call = 1, head
            else:
                chunk = list(itertools.islice(itertools.takewhile(lambda e: not callable(e), self._queue), 900))
                n, call = len(chunk), functools.partial(self.client.log_batch, self.run_id, metrics=chunk)
            try:
                self._retry(call, retries)
            except Exception as err:
                if getattr(err, "error_code", None) in PERMANENT_ERRORS:
                    for _ in range(n):
                        self._queue.popleft()
                    raise
                self._mark_down(err)
                return
            for _ in range(n):
                self._queue.popleft()
        if self._down_since is not None:
            log.warning("MLflow tracking at %s is back after %.0f s; buffered metrics flushed%s", self.uri,
                        time.monotonic() - self._down_since, f" ({self._dropped} oldest entries were dropped)" if self._dropped else "")
            self._down_since, self._dropped = None, 0

    def _retry(self, call: Callable[[], Any], attempts: int) -> None:
        for attempt in range(attempts):
            try:
                call()
                return
            except Exception as err:
                if attempt == attempts - 1 or getattr(err, "error_code", None) in PERMANENT_ERRORS:
                    raise
                time.sleep(self.backoff_s * 2**attempt)

    def _mark_down(self, err: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since, self._wait_s = now, self.retry_s
            log.warning("MLflow tracking at %s failed (%s: %s); training goes on, metrics are buffered in memory and "
                        "sent when it answers again (next try in %.0f s)", self.uri, type(err).__name__,
                        str(err)[:300], self._wait_s)
        else:
            self._wait_s = min(2 * self._wait_s, self.max_retry_s)
        self._next_try = now + self._wait_s


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
