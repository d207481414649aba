"""The OPD control loop (driver side). One step reads like the algorithm:

    1. rollout   y ~ pi_s(.|x) for a batch of training prompts          (rollout group)
    2. teacher   log pi_t(y_t | x, y_<t) for every sampled token       (teacher group)
    3. learner   loss on A_t = lam (log pi_t - log pi_s), AdamW step    (ZeRO-3 learner group)
    4. sync      put the new weights once; rollout workers load them with their next batch
    5. search    at t = 2^n: EffOPD / fixed extrapolation               (evaluator pool)
    6. eval      greedy accuracy on the held-out test split every N steps
    7. log       MLflow metrics, `timing/<phase>` for every phase, busy time and `util/<role>`
    8. ckpt      every N steps: learner + anchor + driver state, then `latest`

Steps 1-2 run as one pipeline (`orchestrator/pipeline.py`): each rollout shard goes to a teacher as
soon as it is sampled, and with `pipeline.max_staleness` s >= 1 the batches of the next s steps
are sampled and scored while the learner trains this one (never across a search, evaluation or
checkpoint).

Nothing here holds model tensors; actors exchange them through the object store.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
import yaml

from actors.evalsets import mean_over
from actors.group import ActorGroup, split
from actors.weights import WeightsHandle, fetch_state_dict
from orchestrator import checkpoint as ckpt
from orchestrator.code_rewards import sandbox_tags
from orchestrator.config import EffOPD, ExOPD, ExperimentConfig, FixedExtrapolation, flatten
from orchestrator.extrapolation import Decision, accept, is_search_step
from orchestrator.faults import fires
from orchestrator.losses import NEEDS_TEACHER_DISTRIBUTION
from orchestrator.monitor import GeometryMonitor
from orchestrator.pipeline import Launched, RolloutPipeline
from orchestrator.placement import TrialActors, check_shared_output, get_all, nccl_layout, start_learners
from orchestrator.plan import ResolvedPlan
from orchestrator.progress import ProgressFile
from orchestrator.task import build_task, eval_examples
from orchestrator.tracking import MlflowLogger

log = logging.getLogger(__name__)


def batch_indices(step: int, n_train: int, batch: int, seed: int, order: str = "sample") -> list[int]:
    """Training prompts of step t (the data position is t). `sample`: a seeded draw without
    replacement per step. `epochs`: positions (t-1)B .. tB-1 of the concatenated per-epoch shuffles,
    epoch e's permutation seeded by (seed, e); a batch that crosses an epoch's end continues into
    the next epoch's permutation."""
    if order == "sample":
        return random.Random(seed * 1_000_003 + step).sample(range(n_train), batch)
    out: list[int] = []
    pos = (step - 1) * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n_train)
        take = min(batch - len(out), n_train - offset)
        out += epoch_permutation(n_train, seed, epoch)[offset: offset + take]
        pos += take
    return out


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_train: int, seed: int, epoch: int) -> list[int]:
    """The order of the training split in `epoch` (seeded by run.seed and the epoch)."""
    return random.Random(f"{seed}/epoch/{epoch}").sample(range(n_train), n_train)


def actor_config(cfg: ExperimentConfig, plan: ResolvedPlan | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """The plain dict every actor receives (resolved paths, the sections it needs, each role's
    tensor-parallel size from the plan)."""
    return {
        "tp": {r.role: r.tp for r in plan.roles} if plan is not None else {},
        "engine_util": dict(plan.engine_util) if plan is not None else {},
        "seed": cfg.run.seed,
        "student_path": str(cfg.model_paths[0].resolve()),
        "teacher_path": str(cfg.model_paths[1].resolve()),
        "task_cfg": cfg.task,
        "rollout": cfg.rollout.model_dump(),
        "learner": {**cfg.learner.model_dump(), "gradient_checkpointing": plan.gradient_checkpointing if plan is not None
                    else bool(cfg.learner.gradient_checkpointing)},
        "loss": cfg.loss.model_dump(),
        "eval_sets": {name: es.model_dump(mode="json") for name, es in cfg.eval.sets.items()},
        "val_size": getattr(cfg.method, "val_size", 50),
        "val_score": getattr(cfg.method, "score", "accuracy"),
        "max_model_len": {"student_path": sequence_budget(cfg, cfg.model_paths[0]),
                          "teacher_path": sequence_budget(cfg, cfg.model_paths[1])},
        "pid_dir": str((run_dir or cfg.run_dir).resolve() / "actors"),
        "vllm_cache_dir": vllm_cache_dir(),
    }


def sequence_budget(cfg: ExperimentConfig, model: Path) -> int:
    """The longest sequence an engine of `model` must hold: rollout.max_prompt_tokens +
    rollout.max_new_tokens, capped at the model's context (the plan refuses a task whose prompts and
    responses do not fit it: `orchestrator.plan.check_context`)."""
    from orchestrator.plan import model_context

    want = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    context = model_context(model)
    return min(want, context) if context else want


def vllm_cache_dir() -> str:
    """VLLM_CACHE_ROOT and TMPDIR of vLLM engines: $FORESIGHT_VLLM_CACHE, else the user's cache
    (`$XDG_CACHE_HOME` or ~/.cache, then foresight/vllm; vLLM's own default is ~/.cache/vllm), shared
    by runs and checkouts: vLLM caches there what it learns by inspecting a model architecture in a
    subprocess (seconds per engine start in a fresh checkout otherwise)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return os.environ.get("FORESIGHT_VLLM_CACHE", str(Path(cache) / "foresight" / "vllm"))


class LearnerLost(RuntimeError):
    """A learner rank died and the run cannot recreate the group: the message says where to resume."""


class NonFiniteSteps(RuntimeError):
    """Too many consecutive non-finite steps: the run stops with its last good checkpoint."""


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[f"timing/{name}"] = time.perf_counter() - t0


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
    weights: WeightsHandle
    """What rollout workers should hold: the learner's newest weights."""

    def __init__(self, cfg: ExperimentConfig, plan: ResolvedPlan, *, resume: bool = True, show_progress: bool = True,
                 parent_run_id: str | None = None, placement_group: Any = None) -> None:
        """`placement_group`: bundles in plan order (a Tune trial's group; see orchestrator/scheduler.py)."""
        self.cfg, self.plan, self.resume, self.show_progress = cfg, plan, resume, show_progress
        self.parent_run_id, self.pg = parent_run_id, placement_group
        self.final: dict[str, float] = {}
        self._stop: Exception | None = None
        self.run_dir = plan.run_dir
        task = build_task(cfg.task, cfg.model_paths[0], cfg.rollout.max_prompt_tokens)
        self.n_train, self.n_test = len(task.train), len(task.test)
        self.data_params = {"data/train_prompts": self.n_train, "data/test_prompts": self.n_test}
        if task.dropped is not None:
            self.data_params.update({f"data/overlong_dropped_{k}": v for k, v in task.dropped.items()})
            if any(task.dropped.values()):
                log.info("dropped overlong prompts (> %d tokens): %s", cfg.rollout.max_prompt_tokens, task.dropped)
        self.test_indices = list(range(min(cfg.eval.num_examples or self.n_test, self.n_test)))
        self.eval_set_sizes: dict[str, int] = {}
        for name, es in cfg.eval.sets.items():
            n = len(eval_examples(cfg.task, es.path, cfg.model_paths[0], cfg.rollout.max_prompt_tokens))
            self.eval_set_sizes[name] = min(es.num_examples or n, n)
            self.data_params[f"data/eval_{name}_prompts"] = self.eval_set_sizes[name]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg, acfg = self.cfg, actor_config(self.cfg, self.plan)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tag = ckpt.latest_tag(self.run_dir) if self.resume else None
        self.state = ckpt.read_driver_state(self.run_dir, tag) if tag else ckpt.RunState()
        self._open_tracker()
        restarts = {"rollout": cfg.rollout.max_restarts, "teacher": cfg.teacher.max_restarts, "evaluator": 3}
        t0 = time.perf_counter()
        self.actors = TrialActors.launch(self.plan, acfg, restarts, pg=self.pg)
        self.rollout, self.teacher, self.learner = self.actors.rollout, self.actors.teacher, self.actors.learner
        self.evaluators = self.actors.evaluators
        self.learner_restarts = 0
        envs = self._start_learners(acfg)
        check_shared_output(lambda path, token: ray.get(self.learner.call("can_read", path, token)), envs, self.run_dir)
        log.info("actors up and ZeRO-3 learner ready in %.1f s", time.perf_counter() - t0)
        self._version = 0
        self._restore_learner(tag)
        self._nccl = self._uses_nccl()
        if self._nccl:
            self._open_nccl()
        if tag:
            self._sync_rollout()
            if cfg.learner.grad_project_rank and self.state.step >= self._project_step:
                self.start_grad_projection_from_disk()
        self.pipeline = RolloutPipeline(self._launch, cfg.pipeline.max_staleness, cfg.run.steps, self._barrier)
        if cfg.geometry.every:
            self.monitor = GeometryMonitor(self._initial_weights(), self.run_dir / "geometry", cfg.geometry.sim_k)

    @property
    def _wanted_scores(self) -> dict[str, Any]:
        """What the teacher returns besides log pi_t(y_t): its distribution (full, or top-k) for the
        full-vocabulary losses, the reference policy's log-probs for ExOPD (lam != 1)."""
        full = self.cfg.loss.type in NEEDS_TEACHER_DISTRIBUTION
        topk = self.cfg.loss.teacher_topk if full else None
        return {"full": full and topk is None, "topk": topk, "ref": self._lam != 1.0}

    @property
    def _lam(self) -> float:
        return self.cfg.method.lam if isinstance(self.cfg.method, ExOPD) else 1.0

    @property
    def _loss_spec(self) -> dict[str, Any]:
        loss = self.cfg.loss
        return {"kind": loss.type, "lam": self._lam, "rlvr_mix": loss.rlvr_mix,
                "importance_correction": loss.importance_correction, "importance_threshold": loss.importance_threshold}

    @property
    def _extrapolates(self) -> bool:
        return isinstance(self.cfg.method, (EffOPD, FixedExtrapolation))

    def _restore_learner(self, tag: str | None) -> None:
        """Learner state from checkpoint `tag` (weights, optimizer, EffOPD anchor, RNG), or the anchor
        at W_0 when there is none."""
        if tag:
            log.info("resuming from %s (step %d)", tag, self.state.step)
            self._on_learners("load_checkpoint", str(ckpt.ckpt_root(self.run_dir)), tag)
        else:
            self._on_learners("set_anchor")
        self.weights = WeightsHandle(self._version, [])
        self._weights_step = self.state.step
        self._version_step = {0: 0}
        """Weights version -> the learner step that made it (W_0: 0), for the samples' staleness."""

    def _on_learners(self, method: str, *args: Any) -> list:
        """Call `method` on every learner rank; fail as soon as one rank fails (a dead rank leaves the
        others waiting in a collective)."""
        return get_all(self.learner.call(method, *args))

    def _start_learners(self, acfg: dict[str, Any]) -> list[dict[str, Any]]:
        """Rendezvous and ZeRO-3 set-up of every rank. A rank that dies here is treated as one that dies
        later: said, and the group recreated within `learner.max_restarts`, else LearnerLost."""
        while True:
            try:
                return start_learners(self.learner)
            except ray.exceptions.RayActorError as err:
                dead = self._dead_ranks()
                if self.learner_restarts >= self.cfg.learner.max_restarts:
                    raise LearnerLost(f"learner rank(s) {dead} died during start-up (learner.max_restarts="
                                      f"{self.cfg.learner.max_restarts} restarts used): {str(err).splitlines()[0]}; "
                                      "see the actors' logs, then rerun the same command") from err
                self.learner_restarts += 1
                log.warning("learner rank(s) %s died during start-up; recreating the learner group (restart %d of %d)",
                            dead, self.learner_restarts, self.cfg.learner.max_restarts)
                self.learner = self.actors.replace_learners(acfg)

    def _dead_ranks(self) -> list[int]:
        dead = []
        for rank, actor in enumerate(self.learner.actors):
            try:
                ray.get(actor.has_cuda.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead or wedged: either way the group is gone
                dead.append(rank)
        return dead

    def _recover_learners(self, step: int, err: Exception) -> None:
        """A learner rank died: say which, at which step and from which checkpoint the run continues;
        recreate the learner group in the trial's placement group and restore it from the last
        checkpoint (`learner.max_restarts` times), or stop with that message."""
        dead = self._dead_ranks()
        if not dead:
            raise err
        tag = ckpt.latest_tag(self.run_dir)
        where = f"checkpoint {tag}" if tag else "step 0 (no checkpoint yet)"
        if self.learner_restarts >= self.cfg.learner.max_restarts or self._nccl:
            why = "the NCCL weight-sync group cannot be rejoined" if self._nccl else \
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

    def _open_tracker(self) -> None:
        """The run's MLflow run: the checkpoint's, else the one this folder started before it crashed
        (its id is written at the start, before any checkpoint), else a new one."""
        cfg = self.cfg
        id_file = ckpt.run_id_file(self.run_dir)
        started = id_file.read_text().strip() if self.resume and id_file.is_file() else None
        self.tracker = MlflowLogger(self.plan.tracking_uri, cfg.tracking.experiment, cfg.run.name,
                                    run_id=self.state.mlflow_run_id or started,
                                    artifact_root=cfg.run.output_dir / "mlartifacts", parent_run_id=self.parent_run_id)
        if self.state.mlflow_run_id is None:
            if started:
                log.info("no checkpoint yet: restarting from step 0 in MLflow run %s", started)
            self.state.mlflow_run_id = self.tracker.run_id
            id_file.write_text(self.tracker.run_id)
            self.tracker.log_params({**flatten(cfg), **self.plan.params(), **self.data_params})
            self.tracker.log_text(self.plan.describe(), "plan.txt")
            self.tracker.set_tags({"method": cfg.method.type, "scale": cfg.run.scale, "seed": str(cfg.run.seed),
                                   "loss": cfg.loss.type, "run_dir": str(self.run_dir.resolve()),
                                   **sandbox_tags(cfg.task)})
            self.tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "resolved_config.yaml")

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
                acc0 = self.evaluate()
                if not self.tracker.client.get_metric_history(self.tracker.run_id, "eval/accuracy"):
                    self.tracker.log(0, {"eval/accuracy": acc0, **self.evaluate_sets(0)})  # not again after a restart
                yield 0, acc0
            bar = _progress(self.state.step, cfg.run.steps, self.show_progress)
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
        from orchestrator.geometry import Checkpoint

        return Checkpoint(self.cfg.model_paths[0]).state_dict()

    @property
    def _project_step(self) -> int:
        return max(1, round(self.cfg.learner.grad_project_at * self.cfg.run.steps))

    def start_grad_projection(self) -> None:
        """Basis V_K of each 2-D weight's update so far; learners project gradients onto it from now on.

        The basis is saved to <run_dir>/projection_basis.pt, so a resumed run projects onto the same one.
        """
        import torch

        from orchestrator.geometry import top_right_basis

        w0, w = self._initial_weights(), fetch_state_dict(self._stored())
        bases = {k: top_right_basis(w[k] - w0[k], self.cfg.learner.grad_project_rank) for k in w0 if w0[k].dim() == 2}
        torch.save(bases, self.run_dir / "projection_basis.pt")
        self._install_projection(bases)

    def start_grad_projection_from_disk(self) -> None:
        import torch

        self._install_projection(torch.load(self.run_dir / "projection_basis.pt"))

    def _install_projection(self, bases: dict) -> None:
        hooked = self._on_learners("set_grad_projection", [ray.put(bases)])
        log.info("rank-%d gradient projection on %d matrices", self.cfg.learner.grad_project_rank, hooked[0])

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
            metrics = self._train_metrics(stats)
            self._count_skip(step, metrics)
            # 5. extrapolation search at t = 2^n
            if self._extrapolates and self.cfg.method.searches_at(step):
                with timer("search"):
                    metrics.update(self.search(step))
            if cfg.learner.grad_project_rank and step == self._project_step:
                self.start_grad_projection()
            # 6. periodic evaluation on the held-out test split (and the geometry monitor)
            if self._evaluates_at(step):
                with timer("eval"):
                    metrics["eval/accuracy"] = self.evaluate()
                    metrics.update(self.evaluate_sets(step))
            if cfg.geometry.every and (step % cfg.geometry.every == 0 or step == cfg.run.steps):
                with timer("geometry"):
                    metrics.update(self.monitor.observe(step, fetch_state_dict(self._stored())))
        self.state.step = step
        return {**metrics, **timer.times, **self._utilization(batch, stats, timer.times)}

    # ------------------------------------------------------------------ phases
    def _launch(self, step: int) -> Launched:
        """Steps 1-2 of `step`, submitted without waiting: rollout shards sampled with the weights
        held now, each passed (as an object ref) to a teacher, which starts when it is ready."""
        cfg = self.cfg
        samplers = self.rollout if cfg.rollout.source == "student" else self.teacher
        parts = split(batch_indices(step, self.n_train, cfg.rollout.batch_prompts, cfg.run.seed, cfg.run.data_order), len(samplers))
        rollout_refs, rollout_meta = samplers.timed_each("generate", [(step, p, self.weights) for p in parts])
        scorers = self.teacher.actors
        scored = [scorers[i % len(scorers)].timed.options(num_returns=2).remote("score", r, **self._wanted_scores)
                  for i, r in enumerate(rollout_refs)]
        rows = [len(p) * cfg.rollout.samples_per_prompt for p in parts]
        return Launched(step, self._weights_step, list(zip(rollout_refs, [t for t, _ in scored], rows)),
                        rollout_meta, [m for _, m in scored])

    def _evaluates_at(self, step: int) -> bool:
        cfg = self.cfg
        return step % cfg.eval.every == 0 or step == cfg.run.steps or (cfg.eval.at_powers_of_two and is_search_step(step))

    def _barrier(self, step: int) -> bool:
        """Steps after which something reads or replaces the weights outside a learner step (search,
        evaluation, gradient projection, checkpoint): the pipeline does not run past them."""
        cfg = self.cfg
        return bool((self._extrapolates and cfg.method.searches_at(step)) or self._evaluates_at(step)
                    or (cfg.learner.grad_project_rank and step == self._project_step)
                    or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0))

    def _utilization(self, batch: Launched, stats: list[dict[str, float]], times: dict[str, float]) -> dict[str, float]:
        """Busy seconds of each role on this step's batch (`timing/<role>_busy`: the busiest actor),
        its utilization (`util/<role>`: summed busy time / (actors x step wall time)), the critical
        path (rollout + teacher of the slowest shard, then learner and sync; with pipelining the
        producer half overlaps the learner: max of the two) and the batch's staleness."""
        rmeta, tmeta = ray.get(batch.rollout_meta), ray.get(batch.teacher_meta)
        scorers = len(self.teacher)
        teacher_busy = [sum(m["busy_s"] for i, m in enumerate(tmeta) if i % scorers == j) for j in range(scorers)]
        learner_busy = [s["busy_s"] for s in stats]
        producer = max(r["busy_s"] + teacher_busy[i % scorers] for i, r in enumerate(rmeta))
        consumer = max(learner_busy) + times["timing/sync"]
        wall = max(times["timing/step"], 1e-9)
        out = {"timing/rollout_busy": max(r["busy_s"] for r in rmeta), "timing/teacher_busy": max(teacher_busy),
               "timing/learner_busy": max(learner_busy),
               "timing/critical_path": max(producer, consumer) if self.cfg.pipeline.max_staleness else producer + consumer,
               "util/rollout": sum(r["busy_s"] for r in rmeta) / (len(self.rollout) * wall),
               "util/teacher": sum(teacher_busy) / (scorers * wall),
               "util/learner": sum(learner_busy) / (len(learner_busy) * wall),
               "pipeline/staleness": float(self._staleness(batch, rmeta))}
        return out

    def _staleness(self, batch: Launched, rmeta: list[dict[str, float]]) -> int:
        """How many learner steps older than on-policy (W_{t-1}) the oldest sample of the batch is,
        from the weights version each rollout worker reports having sampled with."""
        if self.cfg.rollout.source != "student":
            return 0  # off-policy control: the teacher samples
        try:
            return max((batch.step - 1) - self._version_step[int(m["version"])] for m in rmeta)
        except KeyError as err:
            raise RuntimeError(f"step {batch.step}: a rollout worker sampled with weights version {err.args[0]}, "
                               "which the learner never published") from None

    def _sync_rollout(self) -> None:
        """Step 4. Object store (default): learner rank 0 puts the weights once, in buckets; every
        rollout worker loads the same refs when its next call carries the new handle (no round trip
        of its own). NCCL (GPU, vLLM engines): rank 0 broadcasts to every engine worker; the
        object-store copy is then made only when something else needs it."""
        if not self._nccl:
            self.weights = self._publish()
        else:
            self._version += 1
            self.weights = WeightsHandle(self._version, [])
            # the engines' refs first: one that cannot receive (restarted) fails the get instead of a wait on the send
            ray.get(self.rollout.call("nccl_receive", self._nccl_meta, self._version) + self.learner.call("nccl_send"))
        self._version_step[self.weights.version] = self._weights_step

    def _stored(self) -> WeightsHandle:
        """The current weights in the object store (for evaluators, the monitor, the final save)."""
        if self.weights.version and not self.weights.refs:
            refs = self._on_learners("publish_weights", self.cfg.learner.sync_bucket_mb, "current")
            self.weights = WeightsHandle(self.weights.version, refs[0])
        return self.weights

    def _uses_nccl(self) -> bool:
        """The plan's weight sync, if the learner really has CUDA: `auto` falls back to the object
        store where torch sees no GPU (a simulated GPU cluster); an explicit `nccl` cannot."""
        if self.plan.weight_sync != "nccl":
            return False
        if ray.get(self.learner.actors[0].has_cuda.remote()):
            return True
        if self.cfg.learner.weight_sync == "nccl":
            raise RuntimeError("learner.weight_sync=nccl but the learner sees no CUDA device")
        log.warning("weight sync: the plan uses NCCL but the learner sees no CUDA device; using the object store")
        return False

    def _open_nccl(self) -> None:
        """NCCL groups, each with learner rank 0 as rank 0 (the sender) and every worker of every engine
        in it (engine i's TP workers after all earlier engines' workers): `rollout`, and `evaluator`
        when the EffOPD pool is dedicated vLLM evaluators (an engine can be in one group only)."""
        self._nccl_meta = self._open_group("rollout", self.rollout, self.plan.role("rollout").tp)
        if self._scores_over_nccl and self.evaluators is not None:
            self._open_group("evaluator", self.evaluators, self.plan.role("evaluator").tp)

    def _open_group(self, name: str, engines: ActorGroup, tp: int) -> list:
        """Both sides of one group join at once; returns the update's metadata."""
        address, port = ray.get(self.learner.actors[0].nccl_endpoint.remote())
        offsets, world = nccl_layout([tp] * len(engines))
        bucket = int(self.cfg.learner.sync_bucket_mb * 2**20)
        refs = self.learner.call("nccl_open", address, port, world, bucket, name)
        refs += [a.nccl_join.remote(address, port, off, world, bucket) for off, a in zip(offsets, engines.actors)]
        return ray.get(refs)[0]

    @property
    def _scores_over_nccl(self) -> bool:
        """EffOPD candidates reach the pool over NCCL when weights reach the engines that way and the
        pool is vLLM engines (the borrowed rollout engines, or dedicated vLLM evaluators)."""
        pool = self.plan.role("evaluator") or self.plan.role("rollout")
        return self._nccl and pool.backend == "vllm"

    def _publish(self) -> WeightsHandle:
        """Learner rank 0 puts the full weights once; a fresh version number."""
        refs = self._on_learners("publish_weights", self.cfg.learner.sync_bucket_mb)
        self._version += 1
        return WeightsHandle(self._version, refs[0])

    def _count_skip(self, step: int, metrics: dict[str, float]) -> None:
        """Count non-finite (skipped) steps; after `learner.max_skipped_steps` in a row the run stops
        (raised by the loop once the step's metrics are logged)."""
        skipped = metrics["train/step_skipped"] > 0
        self.state.skipped_steps += int(skipped)
        self.state.consecutive_skips = self.state.consecutive_skips + 1 if skipped else 0
        metrics["train/skipped_steps"] = float(self.state.skipped_steps)
        if skipped:
            log.warning("step %d: non-finite loss or gradient, the optimizer step was skipped on every rank", step)
        if self.state.consecutive_skips >= self.cfg.learner.max_skipped_steps:
            tag = ckpt.latest_tag(self.run_dir)
            self._stop = NonFiniteSteps(
                f"steps {step - self.state.consecutive_skips + 1}..{step} had a non-finite loss or gradient and were "
                f"skipped (learner.max_skipped_steps={self.cfg.learner.max_skipped_steps}); the run stops. "
                + (f"Its last checkpoint ({tag}) is intact: fix the cause and rerun the same command to resume."
                   if tag else "No checkpoint was written yet."))

    def _train_metrics(self, stats: list[dict[str, float]]) -> dict[str, float]:
        total = {k: sum(s[k] for s in stats) for k in stats[0]}
        n = max(total["tokens"], 1.0)
        return {
            "train/loss": total["loss_sum"] / n,
            "train/reverse_kl": total["reverse_kl_sum"] / n,
            "train/is_ratio": total["is_ratio_sum"] / n,
            "train/is_clipped_frac": total["is_clipped_sum"] / n,
            "train/rollout_logp_abs_diff": total["logp_diff_sum"] / n,
            "train/grad_norm": stats[0]["grad_norm"],
            "train/reward": total["reward_sum"] / max(total["sequences"], 1.0),
            "train/response_tokens": n,
            "train/step_skipped": stats[0]["skipped"],
            "learner/padded_tokens": total["padded_tokens"],
            "learner/real_tokens": total["real_tokens"],
            "learner/padding_share": 1.0 - total["real_tokens"] / max(total["padded_tokens"], 1.0),
        }

    def evaluate(self) -> float:
        parts = split(self.test_indices, len(self.rollout))
        results = ray.get(self.rollout.call_each("evaluate", [("test", p, self.weights) for p in parts]))
        return sum(s for s, _ in results) / max(sum(c for _, c in results), 1)

    def evaluate_sets(self, step: int) -> dict[str, float]:
        """`eval.sets`: each named set split over the rollout workers; `eval/<set>/<score>` means."""
        metrics: dict[str, float] = {}
        for name, n in self.eval_set_sizes.items():
            parts = split(list(range(n)), len(self.rollout))
            results = ray.get(self.rollout.call_each("eval_set", [(name, p, self.weights, step) for p in parts]))
            metrics.update({f"eval/{name}/{k}": v for k, v in mean_over(results).items()})
        return metrics

    def search(self, step: int) -> dict[str, float]:
        """EffOPD (validate candidates, accept by the sequential rule) or fixed extrapolation."""
        method = self.cfg.method
        coefs = [0.0] + method.coefficients()
        if isinstance(method, FixedExtrapolation):
            k, base, scores = method.k, float("nan"), [float("nan")] * method.k
        else:
            base, *scores = self._score_candidates(coefs)
            k = accept(base, scores, method.comparison)
        if k > 0:
            self._on_learners("extrapolate", coefs[k])
        if k > 0 or self.evaluators is None and not isinstance(method, FixedExtrapolation):
            self._sync_rollout()  # the accepted weights (borrowed engines hold a candidate until then)
        self._on_learners("set_anchor")
        decision = Decision(step, base, scores, k, getattr(method, "comparison", "fixed"), coefs[k])
        self.state.decisions.append(decision.to_dict())
        log.info("step %d: %s accepted k=%d (base %.3f, scores %s)", step, method.type, k, base,
                 ", ".join(f"{s:.3f}" for s in scores))
        out = {"effopd/base_score": base, "effopd/accepted_k": float(k), "effopd/accepted_coef": coefs[k]}
        out.update({f"effopd/score_k{i}": s for i, s in enumerate(scores, start=1)})
        return out

    def _score_candidates(self, coefs: list[float]) -> list[float]:
        """V(W_t + c (W_t - anchor)) for each c, in order; the learner forms each candidate on its fp32
        master partitions (c = 0: the current weights) and sends it once, in the working dtype.
        Object store: the pool (evaluators, or the borrowed rollout engines) scores one candidate per
        actor at a time, in rounds of the pool's size, so at most that many candidates are in the
        object store. NCCL (GPU): rank 0 broadcasts one candidate at a time to the whole pool, and
        each engine scores its share of D_v: V = (sum of the shares' rewards) / |D_v|."""
        pool = self.evaluators if self.evaluators is not None else self.rollout
        if self._scores_over_nccl:
            return [self._score_broadcast(pool, c) for c in coefs]
        scores: list[float] = []
        for lo in range(0, len(coefs), len(pool)):
            handles = [self._stored() if c == 0.0 else self._candidate(c) for c in coefs[lo:lo + len(pool)]]
            scores += [s for r in ray.get([a.score.remote([h]) for a, h in zip(pool.actors, handles)]) for s in r]
        return scores

    def _score_broadcast(self, pool: ActorGroup, coef: float) -> float:
        group = "evaluator" if pool is self.evaluators else "rollout"
        which = "candidate" if coef else "current"
        shares = split(list(range(self.cfg.method.val_size)), len(pool))
        received = [a.score_received.remote(self._nccl_meta, share) for a, share in zip(pool.actors, shares)]
        parts = ray.get(received + self.learner.call("nccl_send", group, which, coef))[:len(received)]
        return sum(total for total, _ in parts) / max(sum(n for _, n in parts), 1)

    def _candidate(self, coef: float) -> WeightsHandle:
        refs = self._on_learners("publish_weights", self.cfg.learner.sync_bucket_mb, "candidate", coef)
        return WeightsHandle(-1, refs[0])

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
        final_dir = self.run_dir / "final"
        self._on_learners("save_hf", str(final_dir.resolve()))
        self.tracker.log_text(str(final_dir.resolve()), "final_checkpoint.txt")
        if self.state.decisions:
            self.tracker.log_json(self.state.decisions, "effopd_decisions.json")
        if self.cfg.geometry.every:
            curve = self.monitor.sim_to_final()
            for step, sim in curve:
                self.tracker.client.log_metric(self.tracker.run_id, "geometry/sim_to_final", sim, step=step)
            self.tracker.log_json(curve, "geometry_sim_to_final.json")
        self.tracker.set_tags({"final_checkpoint": str(final_dir.resolve())})
        done_marker(self.run_dir).write_text(json.dumps({"step": self.state.step, "mlflow_run_id": self.tracker.run_id}))


def done_marker(run_dir: Path) -> Path:
    return run_dir / "done.json"


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="opd", unit="step", disable=not enabled, dynamic_ncols=True)
