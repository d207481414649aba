"""The OPD control loop (driver side). One step reads like the algorithm:

    1. rollout   y ~ pi_s(.|x) for a batch of training prompts          (rollout group)
    2. teacher   log pi_t(y_t | x, y_<t) for every sampled token       (teacher group)
    3. learner   loss on A_t = lam (log pi_t - log pi_s), AdamW step    (ZeRO-3 learner group)
    4. sync      the new weights to the engines, once                   (weight_sync.py: object store | NCCL)
    5. search    at t = 2^n the method decides where to jump            (methods.py; evaluator pool)
    6. eval      greedy accuracy on the held-out test split every N steps
    7. log       MLflow metrics, `timing/<phase>` for every phase, busy time and `util/<role>`
    8. ckpt      every N steps: learner + anchor + driver state, then `latest`

Steps 1-2 run as one pipeline (`orchestrator/pipeline.py`): each rollout shard goes to a teacher as
soon as it is sampled (its data group's teacher with `teacher.route`: `routing.py`; a shared pool's
replicas with `teacher.shared`: `teacher_pool.py`), and with `pipeline.max_staleness` s >= 1 the batches of the next s steps
are sampled and scored while the learner trains this one (never across a search, evaluation or
checkpoint).

Around the loop, each in its own module: what a method changes (`methods.py`), how weights travel
(`weight_sync.py`), step metrics (`step_metrics.py`), gradient projection (`controls.py`), the actors
and their recovery (`placement.py`), what each actor is given (`actor_spec.py`), which prompts a step
sees (`data_order.py`), the run's MLflow record (`run_record.py`). Nothing here holds model tensors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import ray

from actors.evalsets import mean_over
from actors.group import ActorGroup, split
from actors.weights import WeightsHandle, fetch_state_dict
from core.config import ExperimentConfig
from core.data_order import batch_indices
from core.faults import fires
from core.methods import Method, method_of
from core.step_metrics import NonFiniteSteps, count_skip, staleness, train_metrics, utilization
from core.task import summarize
from orchestrator import checkpoint as ckpt
from orchestrator.actor_spec import actor_config
from orchestrator.controls import GradProjection
from orchestrator.monitor import GeometryMonitor
from orchestrator.pipeline import Launched, RolloutPipeline, evaluates_at, is_barrier
from orchestrator.placement import LearnerLost, TrialActors, check_shared_output, get_all, start_learners
from orchestrator.plan import ResolvedPlan
from orchestrator.progress import ProgressFile, Timer, progress_bar
from orchestrator.routing import DEFAULT, group_indices, metric_name, route_metrics, shards
from orchestrator.run_record import close_record, open_record
from orchestrator.tracking import MlflowLogger
from orchestrator.weight_sync import WeightSync, open_sync

log = logging.getLogger(__name__)


class OPDTrainer:
    """Runs one experiment end to end; `run()` returns the final metrics."""

    # set in __init__
    cfg: ExperimentConfig
    plan: ResolvedPlan
    run_dir: Path
    n_train: int
    n_test: int
    # set in start()
    rollout: ActorGroup
    teacher: ActorGroup
    learner: ActorGroup
    evaluators: ActorGroup | None
    tracker: MlflowLogger
    monitor: GeometryMonitor | None
    state: ckpt.RunState
    sync: WeightSync
    """How weights reach the engines (object store or NCCL; `orchestrator/weight_sync.py`)."""

    def __init__(self, cfg: ExperimentConfig, plan: ResolvedPlan, *, resume: bool = True, show_progress: bool = True,
                 parent_run_id: str | None = None, placement_group: Any = None) -> None:
        """`placement_group`: bundles in plan order (a Tune trial's group; see orchestrator/scheduler.py)."""
        self.cfg, self.plan, self.resume, self.show_progress = cfg, plan, resume, show_progress
        self.projection = GradProjection(cfg, plan.run_dir)
        self.parent_run_id, self.pg = parent_run_id, placement_group
        self.final: dict[str, float] = {}
        self._stop: Exception | None = None
        self.run_dir = plan.run_dir
        data = summarize(cfg)
        self.n_train, self.n_test, self.eval_set_sizes, self.data_params = data.n_train, data.n_test, \
            data.eval_set_sizes, data.params
        self.groups = data.groups
        """(train, test) group of every example (`task.group_key`): routes shards, splits evaluations."""
        self.test_indices = list(range(min(cfg.eval.num_examples or self.n_test, self.n_test)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg, acfg = self.cfg, actor_config(self.cfg, self.plan)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tag = ckpt.latest_tag(self.run_dir) if self.resume else None
        self.state = ckpt.read_driver_state(self.run_dir, tag) if tag else ckpt.RunState()
        self.tracker = open_record(cfg, self.plan, self.state, self.resume, self.parent_run_id, self.data_params)
        restarts = {"rollout": cfg.rollout.max_restarts, "teacher": cfg.teacher.max_restarts, "evaluator": 3}
        t0 = time.perf_counter()
        self.actors = TrialActors.launch(self.plan, acfg, restarts, pg=self.pg)
        self.rollout, self.teacher, self.learner = self.actors.rollout, self.actors.teacher, self.actors.learner
        self.evaluators = self.actors.evaluators
        if self.plan.teacher_pool is not None:  # which processes scored this trial (the pool's, shared)
            pids = [str(p["pid"]) for p in ray.get(self.teacher.call("placement"))]
            self.tracker.set_tags({"teacher/pool": self.plan.teacher_pool.name, "teacher/pids": ",".join(pids)})
        envs, self.learner_restarts = self.actors.start_learner_group(acfg, cfg.learner.max_restarts)
        self.learner = self.actors.learner
        check_shared_output(lambda path, token: ray.get(self.learner.call("can_read", path, token)), envs, self.run_dir)
        log.info("actors up and ZeRO-3 learner ready in %.1f s", time.perf_counter() - t0)
        self.sync = open_sync(cfg, self.plan, self.actors)
        self._restore_learner(tag)
        if tag:
            self._sync_rollout()
            if self.projection.active_at(self.state.step):
                self.projection.resume(self._on_learners)
        self.pipeline = RolloutPipeline(self._launch, cfg.pipeline.max_staleness, cfg.run.steps, self._barrier)
        if cfg.geometry.every:
            self.monitor = GeometryMonitor(self._initial_weights(), self.run_dir / "geometry", cfg.geometry.sim_k)

    @functools.cached_property
    def method(self) -> Method:
        """What the configured method changes in the loop (`core/methods.py`)."""
        return method_of(self.cfg.method)

    @property
    def _wanted_scores(self) -> dict[str, Any]:
        return self.method.teacher_scores(self.cfg.loss)

    @property
    def _loss_spec(self) -> dict[str, Any]:
        return self.method.loss_spec(self.cfg)

    @property
    def weights(self) -> WeightsHandle:
        """What rollout workers should hold: the learner's newest weights."""
        return self.sync.weights

    def _restore_learner(self, tag: str | None) -> None:
        """Learner state from checkpoint `tag` (weights, optimizer, EffOPD anchor, RNG), or the anchor
        at W_0 when there is none."""
        if tag:
            log.info("resuming from %s (step %d)", tag, self.state.step)
            self._on_learners("load_checkpoint", str(ckpt.ckpt_root(self.run_dir)), tag)
        else:
            self._on_learners("set_anchor")
        self.sync.restart()
        self._weights_step = self.state.step
        self._version_step = {0: 0}
        """Weights version -> the learner step that made it (W_0: 0), for the samples' staleness."""

    def _on_learners(self, method: str, *args: Any) -> list:
        """Call `method` on every learner rank; fail as soon as one rank fails (a dead rank leaves the
        others waiting in a collective)."""
        return get_all(self.learner.call(method, *args))

    def _recover_learners(self, step: int, err: Exception) -> None:
        """A learner rank died: say which, at which step and from which checkpoint the run continues;
        recreate the learner group in the trial's placement group and restore it from the last
        checkpoint (`learner.max_restarts` times), or stop with that message."""
        dead = self.actors.dead_learner_ranks()
        if not dead:
            raise err
        tag = ckpt.latest_tag(self.run_dir)
        where = f"checkpoint {tag}" if tag else "step 0 (no checkpoint yet)"
        if self.learner_restarts >= self.cfg.learner.max_restarts or not self.sync.rejoinable:
            why = "the NCCL weight-sync group cannot be rejoined" if not self.sync.rejoinable else \
                f"learner.max_restarts={self.cfg.learner.max_restarts} restarts used"
            raise LearnerLost(f"learner rank(s) {dead} died at step {step} ({why}); rerun the same command to "
                              f"continue from {where}") from err
        self.learner_restarts += 1
        log.warning("learner rank(s) %s died at step %d; recreating the learner group and continuing from %s "
                    "(restart %d of %d)", dead, step, where, self.learner_restarts, self.cfg.learner.max_restarts)
        self.learner = self.actors.replace_learners(actor_config(self.cfg, self.plan))
        start_learners(self.learner)
        run_id = self.state.mlflow_run_id
        self.state = ckpt.read_driver_state(self.run_dir, tag) if tag else ckpt.RunState(mlflow_run_id=run_id)
        self._restore_learner(tag)
        self.pipeline.reset()  # batches in flight came from weights the restored learner never had
        self._sync_rollout()  # the rollout workers go back to the restored weights

    def shutdown(self) -> None:
        if not hasattr(self, "actors"):
            return
        try:
            ray.get(self.learner.call("shutdown"), timeout=30)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.actors.kill()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        """The whole run (see `evaluations`); returns the final step's metrics."""
        for _ in self.evaluations():
            pass
        return self.final

    def evaluations(self) -> Iterator[tuple[int, float]]:
        """start (unless started) -> (eval at step 0) -> step_once for every remaining step -> final save,
        yielding (step, test accuracy) after every evaluation.

        A caller that stops early (a Tune scheduler stopping the trial) closes the generator: the
        MLflow run ends KILLED, tagged `pruned` at that step, and its last checkpoint stays."""
        if not hasattr(self, "actors"):
            self.start()
        cfg, at = self.cfg, self.state.step
        status = "FAILED"
        try:
            if self.state.step == 0:
                evals = self.evaluate()
                acc0 = evals["eval/accuracy"]
                if not self.tracker.client.get_metric_history(self.tracker.run_id, "eval/accuracy"):
                    self.tracker.log(0, {**evals, **self.evaluate_sets(0)})  # not again after a restart
                yield 0, acc0
            bar = progress_bar(self.state.step, cfg.run.steps, self.show_progress)
            progress = ProgressFile(self.run_dir, cfg.run.steps)
            step = self.state.step + 1
            while step <= cfg.run.steps:
                try:
                    metrics = self.step_once(step)
                except ray.exceptions.RayActorError as err:
                    self._recover_learners(step, err)  # the logger drops steps it already has
                    step = self.state.step + 1
                    bar.n = self.state.step
                    continue
                self.tracker.log(step, metrics)
                self.final.update(metrics)
                progress.update(step, metrics.get("eval/accuracy"))
                if self._stop is not None:
                    raise self._stop
                if "eval/accuracy" in metrics:
                    at = step
                    yield step, metrics["eval/accuracy"]
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.run.steps:
                    self.save(step)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                                 if k in ("train/reward", "train/reverse_kl", "eval/accuracy")})
                step += 1
            bar.close()
            self.save(cfg.run.steps)
            self.finish()
            status = "FINISHED"
        except GeneratorExit:
            self.tracker.set_tags({"pruned": "true", "pruned_at_step": str(at)})
            status = "KILLED"
            raise
        finally:
            self.tracker.close(status)

    def _initial_weights(self) -> dict:
        """W_0: the student checkpoint's tensors."""
        from core.geometry import Checkpoint

        return Checkpoint(self.cfg.model_paths[0]).state_dict()

    def step_once(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        with timer("step"):
            # 1-2. rollout y ~ pi_s(.|x), each shard scored by a teacher as soon as it is sampled
            #      (log pi_t of every sampled token); launched up to pipeline.max_staleness steps ahead
            batch = self.pipeline.take(step)
            # 3. learner: one ZeRO-3 AdamW step on the OPD loss (each rank fetches its rows only and
            #    starts when they are scored); the driver times the wait on each phase meanwhile
            learner_refs = self.learner.call("train_step", batch.parts, self._loss_spec, step)
            with timer("rollout"):
                ray.wait(batch.rollout_meta, num_returns=len(batch.rollout_meta))
            with timer("teacher"):
                ray.wait(batch.teacher_meta, num_returns=len(batch.teacher_meta))
            with timer("learner"):
                stats = get_all(learner_refs)
            # 4. weight sync: learner -> rollout engines
            self._weights_step = step
            with timer("sync"):
                self._sync_rollout()
            metrics = train_metrics(stats)
            self._count_skip(step, metrics)
            # 5. extrapolation search at t = 2^n
            if self.method.searches_at(step):
                with timer("search"):
                    metrics.update(self.search(step))
            if self.projection.starts_at(step):
                self.projection.start(self._initial_weights(), fetch_state_dict(self.sync.stored()), self._on_learners)
            # 6. periodic evaluation on the held-out test split (and the geometry monitor)
            if self._evaluates_at(step):
                with timer("eval"):
                    metrics.update(self.evaluate())
                    metrics.update(self.evaluate_sets(step))
            if cfg.geometry.every and (step % cfg.geometry.every == 0 or step == cfg.run.steps):
                with timer("geometry"):
                    metrics.update(self.monitor.observe(step, fetch_state_dict(self.sync.stored())))
        self.state.step = step
        return {**metrics, **timer.times, **self._step_metrics(batch, stats, timer.times)}

    # ------------------------------------------------------------------ phases
    def _launch(self, step: int) -> Launched:
        """Steps 1-2 of `step`, submitted without waiting: rollout shards sampled with the weights
        held now, each passed (as an object ref) to a teacher, which starts when it is ready."""
        cfg = self.cfg
        samplers = (self.rollout if cfg.rollout.source == "student" else self.teacher).actors
        indices = batch_indices(step, self.n_train, cfg.rollout.batch_prompts, cfg.run.seed, cfg.run.data_order)
        cut = shards(indices, len(samplers), cfg.teacher.route, self.groups[0] if self.groups else None)
        sampled = [samplers[w].timed.options(num_returns=2).remote("generate", step, part, self.weights) for w, part, _ in cut]
        scorers = {DEFAULT: self.teacher.actors, **{name: g.actors for name, g in self.actors.routes.items()}}
        turn = dict.fromkeys(scorers, 0)  # shards of each teacher go round its replicas
        scored = []
        for (r, _), (_, _, teacher) in zip(sampled, cut):
            group = scorers[teacher]
            scored.append(group[turn[teacher] % len(group)].timed.options(num_returns=2).remote("score", r, **self._wanted_scores))
            turn[teacher] += 1
        rows = [len(part) * cfg.rollout.samples_per_prompt for _, part, _ in cut]
        return Launched(step, self._weights_step, list(zip([r for r, _ in sampled], [t for t, _ in scored], rows)),
                        [m for _, m in sampled], [m for _, m in scored], [t for _, _, t in cut])

    def _evaluates_at(self, step: int) -> bool:
        return evaluates_at(self.cfg, step)

    def _barrier(self, step: int) -> bool:
        """Steps the pipeline does not run past (`orchestrator/pipeline.py::is_barrier`)."""
        return is_barrier(self.cfg, self.method, step)

    def _step_metrics(self, batch: Launched, stats: list[dict[str, float]], times: dict[str, float]) -> dict[str, float]:
        """Busy time and utilization of each role, the critical path, the batch's staleness
        (`core/step_metrics.py`)."""
        rmeta, tmeta = ray.get(batch.rollout_meta), ray.get(batch.teacher_meta)
        out = utilization(rmeta, tmeta, stats, times, len(self.rollout), len(self.teacher),
                          pipelined=bool(self.cfg.pipeline.max_staleness))
        if self.cfg.teacher.route:
            out.update(route_metrics(batch.teachers, rmeta, tmeta))
        # off-policy control (the teacher samples): no student weights to be stale
        out["pipeline/staleness"] = float(staleness(batch.step, rmeta, self._version_step)
                                          if self.cfg.rollout.source == "student" else 0)
        return out

    def _sync_rollout(self) -> None:
        """Step 4: the learner's weights to the rollout engines as a new version (`orchestrator/weight_sync.py`)."""
        self._version_step[self.sync.push().version] = self._weights_step

    def _count_skip(self, step: int, metrics: dict[str, float]) -> None:
        """Count non-finite (skipped) steps; after `learner.max_skipped_steps` in a row the run stops
        (raised by the loop once the step's metrics are logged)."""
        if count_skip(self.state, metrics):
            log.warning("step %d: non-finite loss or gradient, the optimizer step was skipped on every rank", step)
        if self.state.consecutive_skips >= self.cfg.learner.max_skipped_steps:
            self._stop = NonFiniteSteps.at(step, self.state.consecutive_skips, self.cfg.learner.max_skipped_steps,
                                           ckpt.latest_tag(self.run_dir))

    def evaluate(self) -> dict[str, float]:
        """Greedy test accuracy, `eval/accuracy`, and with `task.group_key` each group's,
        `eval/group/<group>/accuracy` (the test indices cut per group, then over the workers)."""
        by_group = group_indices(self.test_indices, self.groups[1]) if self.groups else {None: self.test_indices}
        calls = [(g, p) for g, idx in by_group.items() for p in split(idx, len(self.rollout)) if p]
        workers = self.rollout.actors
        results = ray.get([workers[i % len(workers)].evaluate.remote("test", p, self.weights) for i, (_, p) in enumerate(calls)])
        out = {"eval/accuracy": sum(s for s, _ in results) / max(sum(c for _, c in results), 1)}
        if self.groups:
            for g in by_group:
                mine = [r for (h, _), r in zip(calls, results) if h == g]
                out[f"eval/group/{metric_name(g)}/accuracy"] = sum(s for s, _ in mine) / max(sum(c for _, c in mine), 1)
        return out

    def evaluate_sets(self, step: int) -> dict[str, float]:
        """`eval.sets`: each named set split over the rollout workers; `eval/<set>/<score>` means."""
        metrics: dict[str, float] = {}
        for name, n in self.eval_set_sizes.items():
            parts = split(list(range(n)), len(self.rollout))
            results = ray.get(self.rollout.call_each("eval_set", [(name, p, self.weights, step) for p in parts]))
            metrics.update({f"eval/{name}/{k}": v for k, v in mean_over(results).items()})
        return metrics

    def search(self, step: int) -> dict[str, float]:
        """Step 5: the method decides where to jump (EffOPD: candidates scored on D_v, the accept rule);
        the ranks jump on their fp32 masters, the engines follow, the anchor moves to the accepted point."""
        # the direction W_t - anchor against the last search's (partition-local sums, reduced)
        directions = self._on_learners("direction_stats")[0] if self.method.extrapolates else {}
        d = self.method.decide(step, self.sync.score)
        if d.accepted_k > 0:
            self._on_learners("extrapolate", d.accepted_coef, self.method.params)
        if d.accepted_k > 0 or (self.method.candidates and self.evaluators is None):
            self._sync_rollout()  # the accepted weights (borrowed engines hold a candidate until then)
        self._on_learners("set_anchor")
        self.state.decisions.append(d.to_dict())
        log.info("step %d: %s accepted k=%d (base %.3f, scores %s)", step, self.method.type, d.accepted_k,
                 d.base_score, ", ".join(f"{s:.3f}" for s in d.scores))
        out = {"effopd/base_score": d.base_score, "effopd/accepted_k": float(d.accepted_k),
               "effopd/accepted_coef": d.accepted_coef}
        out.update({f"effopd/score_k{i}": s for i, s in enumerate(d.scores, start=1)})
        return {**out, **directions}

    def save(self, step: int) -> None:
        tag = ckpt.tag_for(step)
        root = ckpt.ckpt_root(self.run_dir)
        self._on_learners("save_checkpoint", str(root), tag)
        if fires("kill_in_save", step):  # test hook: SIGKILL everything between the ranks' files and `latest`
            os.killpg(0, signal.SIGKILL)
        ckpt.write_driver_state(self.run_dir, tag, self.state)
        ckpt.commit(self.run_dir, tag, self.cfg.checkpoint.keep)

    def finish(self) -> None:
        """Final HF checkpoint (written by learner rank 0, tensor by tensor), decisions and the
        checkpoint path as MLflow artifacts."""
        final_dir = (self.run_dir / "final").resolve()
        self._on_learners("save_hf", str(final_dir))
        close_record(self.tracker, final_dir, self.state.decisions, self.monitor.sim_to_final() if self.cfg.geometry.every else None)
        done_marker(self.run_dir).write_text(json.dumps({"step": self.state.step, "mlflow_run_id": self.tracker.run_id}))


def done_marker(run_dir: Path) -> Path:
    return run_dir / "done.json"

