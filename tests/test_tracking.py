"""Tracking outages: an unreachable store is refused before launch; a store failing mid-run loses
no metrics and never stops training (MlflowLogger retries, buffers, replays in order)."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.config import ConfigError
from orchestrator.tracking import STEP_KEY, MlflowLogger, check_tracking


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """The probes go straight to 127.0.0.1, whatever proxy this machine sets."""
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)


class FlakyClient:
    """The MlflowClient calls MlflowLogger makes; every call fails while `failures` > 0."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.metrics: list[tuple[int, str, float]] = []
        self.tags: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.terminated: str | None = None

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("tracking server unreachable")

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name, artifact_location=None):
        return "1"

    def create_run(self, exp_id, tags=None, run_name=None):
        return SimpleNamespace(info=SimpleNamespace(run_id="run1"))

    def log_batch(self, run_id, metrics=(), params=()):
        self._maybe_fail()
        self.metrics += [(m.step, m.key, m.value) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def get_run(self, run_id):
        self._maybe_fail()
        return SimpleNamespace(data=SimpleNamespace(params=dict(self.params)))

    def set_tag(self, run_id, key, value):
        self._maybe_fail()
        self.tags[key] = value

    def set_terminated(self, run_id, status="FINISHED"):
        self._maybe_fail()
        self.terminated = status


def logger(client: FlakyClient, **outage) -> MlflowLogger:
    tracker = MlflowLogger("http://tracking.invalid", "exp", "run", client=client)
    tracker.backoff_s, tracker.retry_s = 0.0, 0.0
    for key, value in outage.items():
        setattr(tracker, key, value)
    return tracker


def step_metrics(step: int) -> dict[str, float]:
    return {STEP_KEY: 0.1 * step, "train/loss": float(step), "eval/accuracy": step / 100}


@pytest.mark.parametrize("failures", [0, 1, 2, 5, 13])
def test_every_metric_arrives_exactly_once_in_order_through_an_outage(failures, caplog):
    client = FlakyClient(failures)
    tracker = logger(client, retries=2)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        for step in range(1, 11):
            tracker.log(step, step_metrics(step))  # never raises: training goes on
        tracker.set_tags({"method": "effopd"})
        tracker.close("FINISHED")
    expected = [(s, k, v) for s in range(1, 11) for k, v in step_metrics(s).items()]
    assert client.metrics == expected
    assert client.tags == {"method": "effopd"} and client.terminated == "FINISHED"
    outages = [r for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(outages) == (1 if failures >= 2 else 0)  # a failure the retries absorb is no outage
    assert not tracker._queue and tracker._down_since is None


def test_during_an_outage_steps_do_not_wait_for_the_store():
    client = FlakyClient(failures=10**6)
    tracker = logger(client, retries=3, retry_s=3600.0)
    tracker.log(1, step_metrics(1))
    calls = client.calls
    assert calls == 3  # the first failure is retried, then the store counts as down
    for step in range(2, 50):
        tracker.log(step, step_metrics(step))
    assert client.calls == calls  # no call until the next try is due
    assert len(tracker._queue) == 49 * 3


def test_resume_dedup_still_drops_steps_already_stored():
    client = FlakyClient()
    tracker = logger(client)
    tracker.last_logged_step = 5
    tracker.log(5, step_metrics(5))
    tracker.log(6, step_metrics(6))
    tracker.log(3, {"eval/accuracy": 0.5})  # no step key: not a training step, kept
    assert [m[0] for m in client.metrics] == [6, 6, 6, 3]


def test_buffered_steps_count_as_logged():
    client = FlakyClient(failures=1)
    tracker = logger(client, retries=1)
    tracker.log(1, step_metrics(1))  # buffered
    tracker.log(1, step_metrics(1))  # the same step again: dropped, not logged twice
    tracker.close()
    assert [m[0] for m in client.metrics] == [1, 1, 1]


def test_store_still_down_at_close_reports_and_does_not_raise(caplog):
    client = FlakyClient(failures=10**6)
    tracker = logger(client, retries=2)
    tracker.log(1, step_metrics(1))
    with caplog.at_level(logging.ERROR, logger="orchestrator.tracking"):
        tracker.close("FINISHED")
    assert "3 metrics and 1 other calls" in caplog.text and client.terminated is None


def test_buffer_is_bounded(caplog):
    client = FlakyClient(failures=10**6)
    tracker = logger(client, retries=1, retry_s=3600.0, max_buffered=7)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        for step in range(1, 6):
            tracker.log(step, step_metrics(step))
    queued = [(m.step, m.key) for m in tracker._queue]
    assert len(queued) == 7 and [step for step, _ in queued] == [3, 4, 4, 4, 5, 5, 5]
    assert "dropping the oldest" in caplog.text
    client.failures = 0
    tracker.close()  # its own call takes one more place
    assert [(step, key) for step, key, _ in client.metrics] == queued[1:] and client.terminated == "FINISHED"


def test_invalid_requests_are_raised_not_buffered():
    class Invalid(Exception):
        error_code = "INVALID_PARAMETER_VALUE"

    client = FlakyClient()

    def reject(run_id, metrics=(), params=()):
        raise Invalid("bad metric")

    client.log_batch = reject
    tracker = logger(client, retries=3)
    with pytest.raises(Invalid):
        tracker.log(1, step_metrics(1))
    assert not tracker._queue


# ----------------------------------------------------------------------------- before launch
class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        ok = self.path.startswith("/api/2.0/mlflow/experiments/search")
        self.send_response(self.status if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"experiments": []}')

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_answering_server_passes(server):
    check_tracking([server, server + "/"], "exp.yaml")


@pytest.mark.parametrize("suffix, status, reason", [
    ("", 401, "refused the request (HTTP 401)"),
    ("", 503, "answers HTTP 503"),
    ("/prefix", 200, "not as an MLflow tracking server"),
])
def test_server_answering_wrong_is_refused(server, monkeypatch, suffix, status, reason):
    monkeypatch.setattr(_Handler, "status", status)
    with pytest.raises(ConfigError) as err:
        check_tracking([server + suffix], "exp.yaml")
    assert err.value.key == "tracking.uri" and reason in err.value.reason


def test_unreachable_server_is_refused():
    with pytest.raises(ConfigError) as err:
        check_tracking([f"http://127.0.0.1:{free_port()}"], "exp.yaml", timeout=2)
    assert str(err.value).startswith("exp.yaml: tracking.uri: no MLflow tracking server answers at http://127.0.0.1:")


def test_local_stores_need_a_writable_or_creatable_folder(tmp_path: Path):
    check_tracking([f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}", f"file://{tmp_path / 'mlruns'}",
                    str(tmp_path / "mlruns2"), "sqlite://", "databricks"], "exp.yaml")
    assert list(tmp_path.iterdir()) == []  # nothing created
    (tmp_path / "afile").write_text("")
    for uri in (f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}", f"file://{tmp_path / 'afile'}"):
        with pytest.raises(ConfigError) as err:
            check_tracking([uri], "exp.yaml")
        assert err.value.key == "tracking.uri" and "writable" in err.value.reason
