"""Scheduler: runs a sweep's trials concurrently as the cluster's capacity allows.

Each trial gets a placement group with one bundle per actor of its plan (rollout, teacher,
learner ranks, evaluators) and a `TrialRunner` actor that runs the trial's control loop
(`OPDTrainer`) inside the cluster; the trial's actors are scheduled into its placement group.
Trials wait in a queue until their CPUs are free; a trial whose runner fails (a crash, a killed
process) is retried up to `max_retries` times and resumes from its last checkpoint into the same
MLflow run; finished trials (`<run_dir>/done.json`) are skipped when a sweep is re-run. On
Ctrl-C or `ray job stop` the scheduler kills its runners and removes their placement groups.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from orchestrator.config import ExperimentConfig
from orchestrator.plan import ResolvedPlan
from orchestrator.progress import ProgressBoard

log = logging.getLogger(__name__)


class TrialRunner:
    """Runs one trial's OPD loop; plain Python, `ray.remote` is applied by the scheduler."""

    def run(self, cfg: ExperimentConfig, plan: ResolvedPlan, parent_run_id: str | None, pg: Any) -> dict[str, float]:
        from actors.weights import write_pid
        from orchestrator.trainer import OPDTrainer

        write_pid({"pid_dir": str(cfg.run_dir.resolve() / "actors")}, "trial", 0)
        trainer = OPDTrainer(cfg, plan, resume=True, parent_run_id=parent_run_id, show_progress=False,
                             placement_group=pg)
        try:
            return trainer.run()
        finally:
            trainer.shutdown()


@dataclass
class Running:
    cfg: ExperimentConfig
    plan: ResolvedPlan
    attempt: int
    pg: Any
    runner: Any
    ref: Any


@dataclass
class SweepResult:
    finished: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def run_sweep(trials: list[tuple[ExperimentConfig, ResolvedPlan]], parent_run_id: str | None, *,
              max_retries: int = 2, max_concurrent: int | None = None, capacity: float | None = None,
              poll: float = 0.5) -> SweepResult:
    """Run trials concurrently within the cluster's CPUs and GPUs (`capacity`: CPUs, default the
    cluster's); retry failures. A trial starts when its placement group (the plan's bundles) fits."""
    from orchestrator.trainer import done_marker

    result = SweepResult()
    resources = ray.cluster_resources()
    capacity = capacity if capacity is not None else float(resources.get("CPU", 0))
    gpu_capacity = float(resources.get("GPU", 0))
    queue: deque[tuple[ExperimentConfig, ResolvedPlan, int]] = deque()
    for cfg, plan in trials:
        if done_marker(plan.run_dir).is_file():
            result.skipped.append(cfg.run.name)
        else:
            queue.append((cfg, plan, 0))
    running: list[Running] = []
    runner_cls = ray.remote(num_cpus=0, max_restarts=0)(TrialRunner)
    stop = _install_stop_handler()
    total, last = len(queue), ""
    board = ProgressBoard()
    try:
        while queue or running:
            if stop["requested"]:
                raise KeyboardInterrupt
            used = sum(r.plan.total_cpus for r in running)
            used_gpus = sum(r.plan.total_gpus for r in running)
            while queue and used + queue[0][1].total_cpus <= capacity + 1e-9 and (
                    used_gpus + queue[0][1].total_gpus <= gpu_capacity) and (
                    max_concurrent is None or len(running) < max_concurrent):
                cfg, plan, attempt = queue.popleft()
                pg = placement_group(plan.bundles(), strategy="PACK", name=f"foresight-{cfg.run.name}")
                ray.get(pg.ready(), timeout=600)
                runner = runner_cls.options(name=None).remote()
                ref = runner.run.remote(cfg, plan, parent_run_id, pg)
                running.append(Running(cfg, plan, attempt, pg, runner, ref))
                used += plan.total_cpus
                used_gpus += plan.total_gpus
                log.info("trial %s started (attempt %d)", cfg.run.name, attempt + 1)
            if not running:
                cfg, plan, _ = queue.popleft()
                result.failed[cfg.run.name] = (f"needs {plan.total_cpus:g} CPUs and {plan.total_gpus} GPUs, the cluster "
                                               f"has {capacity:g} and {gpu_capacity:g}")
                continue
            done, _ = ray.wait([r.ref for r in running], num_returns=1, timeout=poll)
            for ref in done:
                r = next(x for x in running if x.ref == ref)
                running.remove(r)
                _release(r)
                try:
                    result.finished[r.cfg.run.name] = ray.get(ref)
                    log.info("trial %s finished", r.cfg.run.name)
                except Exception as err:  # noqa: BLE001 - any trial failure is retried or reported
                    reason = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                    if r.attempt < max_retries:
                        log.warning("trial %s failed (%s); retrying from its last checkpoint", r.cfg.run.name, reason)
                        queue.appendleft((r.cfg, r.plan, r.attempt + 1))
                    else:
                        result.failed[r.cfg.run.name] = reason
                        log.error("trial %s failed after %d attempts: %s", r.cfg.run.name, r.attempt + 1, reason)
            status = (f"trials: {len(result.finished)} done, {len(running)} running, {len(queue)} queued, "
                      f"{len(result.failed)} failed (of {total})")
            if status != last:
                board.message(status)
                last = status
            board.show({r.cfg.run.name: r.plan.run_dir for r in running})
    except KeyboardInterrupt:
        log.warning("stopping: removing %d running trial(s); re-run the same command to resume", len(running))
        for r in running:
            _release(r)
        raise
    return result


def _release(r: Running) -> None:
    try:
        ray.kill(r.runner, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead
        pass
    try:
        remove_placement_group(r.pg)
    except Exception:  # noqa: BLE001 - already removed
        pass


def _install_stop_handler() -> dict[str, bool]:
    """SIGTERM (what `ray job stop` sends) stops the sweep like Ctrl-C does."""
    state = {"requested": False}
    try:
        signal.signal(signal.SIGTERM, lambda *_: state.update(requested=True))
    except ValueError:  # not the main thread
        pass
    return state


