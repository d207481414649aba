"""The OPD control loop (driver side). One step reads like the algorithm:

    1. rollout   y ~ pi_s(.|x) for a batch of training prompts          (rollout group)
    2. teacher   log pi_t(y_t | x, y_<t) for every sampled token       (teacher group)
    3. learner   loss on A_t = lam (log pi_t - log pi_s), AdamW step    (ZeRO-3 learner group)
    4. sync      put the new weights once; rollout workers load them
    5. search    at t = 2^n: EffOPD / fixed extrapolation               (evaluator pool)
    6. eval      greedy accuracy on the held-out test split every N steps
    7. log       MLflow metrics, `timing/<phase>` for every phase
    8. ckpt      every N steps: learner + anchor + driver state, then `latest`

Nothing here holds model tensors; actors exchange them through the object store.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import yaml

from actors.evaluator import CandidateEvaluator
from actors.group import ActorGroup, free_port, split
from actors.learner import Learner
from actors.rollout import RolloutWorker, VllmRolloutWorker
from actors.teacher import TeacherScorer, VllmTeacherScorer
from actors.weights import WeightsHandle, fetch_state_dict
from orchestrator import checkpoint as ckpt
from orchestrator.config import EffOPD, ExOPD, ExperimentConfig, FixedExtrapolation, flatten
from orchestrator.extrapolation import Decision, accept, coefficient, is_search_step
from orchestrator.losses import NEEDS_TEACHER_DISTRIBUTION
from orchestrator.monitor import GeometryMonitor
from orchestrator.plan import ResolvedPlan
from orchestrator.task import build_task
from orchestrator.tracking import MlflowLogger

log = logging.getLogger(__name__)


def batch_indices(step: int, n_train: int, batch: int, seed: int) -> list[int]:
    """Training prompts of step t: a seeded draw without replacement (the data position is t)."""
    return random.Random(seed * 1_000_003 + step).sample(range(n_train), batch)


def actor_config(cfg: ExperimentConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """The plain dict every actor receives (resolved paths, the sections it needs)."""
    return {
        "seed": cfg.run.seed,
        "student_path": str(cfg.model_paths[0].resolve()),
        "teacher_path": str(cfg.model_paths[1].resolve()),
        "task_cfg": cfg.task,
        "rollout": cfg.rollout.model_dump(),
        "learner": cfg.learner.model_dump(),
        "loss": cfg.loss.model_dump(),
        "val_size": getattr(cfg.method, "val_size", 50),
        "val_score": getattr(cfg.method, "score", "accuracy"),
        "pid_dir": str((run_dir or cfg.run_dir).resolve() / "actors"),
        "vllm_cache_dir": vllm_cache_dir(),
    }


def vllm_cache_dir() -> str:
    """VLLM_CACHE_ROOT and TMPDIR of vLLM engines: the project's `.cache/vllm` (shared by runs, so
    compiled ops are reused), or $FORESIGHT_VLLM_CACHE."""
    return os.environ.get("FORESIGHT_VLLM_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "vllm"))


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
    anchor: WeightsHandle | None
    """Full weights of the EffOPD anchor (the previous accepted point), for evaluators."""

    def __init__(self, cfg: ExperimentConfig, plan: ResolvedPlan, *, resume: bool = True, show_progress: bool = True,
                 parent_run_id: str | None = None, placement_group: Any = None,
                 on_eval: Callable[[int, float], bool] | None = None) -> None:
        """`placement_group`: bundles in plan order (scheduler); `on_eval(step, acc)` returning True
        stops the run early (Optuna pruning)."""
        self.cfg, self.plan, self.resume, self.show_progress = cfg, plan, resume, show_progress
        self.parent_run_id, self.pg, self.on_eval = parent_run_id, placement_group, on_eval
        self.pruned = False
        self.run_dir = plan.run_dir
        task = build_task(cfg.task)
        self.n_train, self.n_test = len(task.train), len(task.test)
        self.test_indices = list(range(min(cfg.eval.num_examples or self.n_test, self.n_test)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg, acfg = self.cfg, actor_config(self.cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tag = ckpt.latest_tag(self.run_dir) if self.resume else None
        self.state = ckpt.read_driver_state(self.run_dir, tag) if tag else ckpt.RunState()
        restart = {"max_restarts": cfg.rollout.max_restarts, "max_task_retries": cfg.rollout.max_restarts}
        offsets = self._bundle_offsets()
        rollout_cls = VllmRolloutWorker if cfg.rollout.backend == "vllm" else RolloutWorker
        teacher_cls = VllmTeacherScorer if cfg.teacher.backend == "vllm" else TeacherScorer
        self.rollout = ActorGroup(rollout_cls, cfg.rollout.num_workers, lambda i: (acfg, i),
                                  {"num_cpus": cfg.rollout.num_cpus, **restart}, (self.pg, offsets["rollout"]))
        self.teacher = ActorGroup(teacher_cls, cfg.teacher.num_workers, lambda i: (acfg, i),
                                  {"num_cpus": cfg.teacher.num_cpus, "max_restarts": cfg.teacher.max_restarts,
                                   "max_task_retries": cfg.teacher.max_restarts}, (self.pg, offsets["teacher"]))
        port, ws = free_port(), cfg.learner.world_size
        self.learner = ActorGroup(Learner, ws, lambda r: (r, ws, port, acfg), {"num_cpus": cfg.learner.num_cpus_per_rank},
                                  (self.pg, offsets["learner"]))
        self.evaluators = None
        if isinstance(cfg.method, EffOPD):
            self.evaluators = ActorGroup(CandidateEvaluator, self.plan.num_evaluators, lambda i: (acfg,),
                                         {"num_cpus": cfg.method.evaluator_cpus, "max_restarts": 3, "max_task_retries": 3},
                                         (self.pg, offsets.get("evaluator", 0)))
        ray.get(self.learner.call("setup"))
        if tag:
            log.info("resuming from %s (step %d)", tag, self.state.step)
            ray.get(self.learner.call("load_checkpoint", str(ckpt.ckpt_root(self.run_dir)), tag))
        else:
            ray.get(self.learner.call("set_anchor"))
        self._version = 0
        self.weights = WeightsHandle(0, [])
        self.anchor = self._publish(which="anchor") if self._extrapolates else None
        self._nccl = self._uses_nccl()
        if self._nccl:
            self._open_nccl()
        if tag:
            self._sync_rollout()
            if cfg.learner.grad_project_rank and self.state.step >= self._project_step:
                self.start_grad_projection_from_disk()
        self._open_tracker()
        if cfg.geometry.every:
            self.monitor = GeometryMonitor(self._initial_weights(), self.run_dir / "geometry", cfg.geometry.sim_k)

    def _bundle_offsets(self) -> dict[str, int]:
        """First placement-group bundle of each role (bundles follow the plan's group order)."""
        offsets, at = {}, 0
        for g in self.plan.groups:
            offsets[g.role] = at
            at += g.actors
        return offsets

    @property
    def _extrapolates(self) -> bool:
        return isinstance(self.cfg.method, (EffOPD, FixedExtrapolation))

    def _open_tracker(self) -> None:
        cfg = self.cfg
        self.tracker = MlflowLogger(self.plan.tracking_uri, cfg.tracking.experiment, cfg.run.name,
                                    run_id=self.state.mlflow_run_id, artifact_root=cfg.run.output_dir / "mlartifacts",
                                    parent_run_id=self.parent_run_id)
        if self.state.mlflow_run_id is None:
            self.state.mlflow_run_id = self.tracker.run_id
            self.tracker.log_params(flatten(cfg))
            self.tracker.set_tags({"method": cfg.method.type, "scale": cfg.run.scale, "seed": str(cfg.run.seed),
                                   "loss": cfg.loss.type, "run_dir": str(self.run_dir.resolve())})
            self.tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "resolved_config.yaml")

    def shutdown(self) -> None:
        for group in (self.rollout, self.teacher, self.evaluators):
            if group is not None:
                group.kill()
        try:
            ray.get(self.learner.call("shutdown"), timeout=30)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.learner.kill()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        """start -> (eval at step 0) -> step_once for every remaining step -> final save."""
        self.start()
        cfg, final = self.cfg, {}
        status = "FAILED"
        try:
            if self.state.step == 0:
                acc0 = self.evaluate()
                self.tracker.log(0, {"eval/accuracy": acc0})
                self._report(0, acc0)
            bar = _progress(self.state.step, cfg.run.steps, self.show_progress)
            for step in range(self.state.step + 1, cfg.run.steps + 1):
                metrics = self.step_once(step)
                self.tracker.log(step, metrics)
                final.update(metrics)
                if "eval/accuracy" in metrics and self._report(step, metrics["eval/accuracy"]):
                    self.pruned = True
                    self.tracker.set_tags({"pruned": "true", "pruned_at_step": str(step)})
                    status = "KILLED"
                    bar.close()
                    return final
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.run.steps:
                    self.save(step)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                                 if k in ("train/reward", "train/reverse_kl", "eval/accuracy")})
            bar.close()
            self.save(cfg.run.steps)
            self.finish()
            status = "FINISHED"
            return final
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
        hooked = ray.get(self.learner.call("set_grad_projection", [ray.put(bases)]))
        log.info("rank-%d gradient projection on %d matrices", self.cfg.learner.grad_project_rank, hooked[0])

    def _report(self, step: int, acc: float) -> bool:
        return bool(self.on_eval and self.on_eval(step, acc))

    def step_once(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        with timer("step"):
            # 1. rollout: the student samples completions for this step's prompts
            with timer("rollout"):
                samplers = self.rollout if cfg.rollout.source == "student" else self.teacher
                parts = split(batch_indices(step, self.n_train, cfg.rollout.batch_prompts, cfg.run.seed), len(samplers))
                rollout_refs = samplers.call_each("generate", [(step, p, self.weights) for p in parts])
                ray.wait(rollout_refs, num_returns=len(rollout_refs))
            # 2. teacher: log-prob of every sampled token
            with timer("teacher"):
                full = cfg.loss.type in NEEDS_TEACHER_DISTRIBUTION
                scorers = self.teacher.actors
                teacher_refs = [scorers[i % len(scorers)].score.remote(r, full) for i, r in enumerate(rollout_refs)]
                ray.wait(teacher_refs, num_returns=len(teacher_refs))
            # 3. learner: one ZeRO-3 AdamW step on the OPD loss
            with timer("learner"):
                adv_scale = cfg.method.lam if isinstance(cfg.method, ExOPD) else 1.0
                stats = ray.get(self.learner.call("train_step", rollout_refs, teacher_refs, adv_scale, step))
            # 4. weight sync: learner -> rollout engines
            with timer("sync"):
                self._sync_rollout()
            metrics = self._train_metrics(stats)
            # 5. extrapolation search at t = 2^n
            if self._extrapolates and is_search_step(step, self.cfg.method.max_search_step):
                with timer("search"):
                    metrics.update(self.search(step))
            if cfg.learner.grad_project_rank and step == self._project_step:
                self.start_grad_projection()
            # 6. periodic evaluation on the held-out test split (and the geometry monitor)
            if step % cfg.eval.every == 0 or step == cfg.run.steps or (cfg.eval.at_powers_of_two and is_search_step(step)):
                with timer("eval"):
                    metrics["eval/accuracy"] = self.evaluate()
            if cfg.geometry.every and (step % cfg.geometry.every == 0 or step == cfg.run.steps):
                with timer("geometry"):
                    metrics.update(self.monitor.observe(step, fetch_state_dict(self._stored())))
        self.state.step = step
        return {**metrics, **timer.times}

    # ------------------------------------------------------------------ phases
    def _sync_rollout(self) -> None:
        """Step 4. Object store (default): learner rank 0 puts the weights once, in buckets, and every
        rollout worker loads the same refs. NCCL (GPU, vLLM engines): rank 0 broadcasts to every
        engine worker; the object-store copy is then made only when something else needs it."""
        if not self._nccl:
            self.weights = self._publish()
            ray.get(self.rollout.call("sync", self.weights))
            return
        self._version += 1
        self.weights = WeightsHandle(self._version, [])
        ray.get(self.learner.call("nccl_send") + self.rollout.call("nccl_receive", self._nccl_meta, self._version))

    def _stored(self) -> WeightsHandle:
        """The current weights in the object store (for evaluators, the monitor, the final save)."""
        if self.weights.version and not self.weights.refs:
            refs = ray.get(self.learner.call("publish_weights", self.cfg.learner.sync_bucket_mb, "current"))
            self.weights = WeightsHandle(self.weights.version, refs[0])
        return self.weights

    def _uses_nccl(self) -> bool:
        mode = self.cfg.learner.weight_sync
        gpus = self.plan.gpu is not None
        return mode == "nccl" or (mode == "auto" and gpus and self.cfg.rollout.backend == "vllm")

    def _open_nccl(self) -> None:
        """One NCCL group: learner rank 0 (rank 0, the sender) and each engine (one worker per
        engine here: rank offset 1 + i). Both sides must join at once."""
        address, port = ray.get(self.learner.actors[0].nccl_endpoint.remote())
        n, bucket = len(self.rollout), int(self.cfg.learner.sync_bucket_mb * 2**20)
        refs = self.learner.call("nccl_open", address, port, 1 + n, bucket)
        refs += [a.nccl_join.remote(address, port, 1 + i, 1 + n, bucket) for i, a in enumerate(self.rollout.actors)]
        self._nccl_meta = ray.get(refs)[0]

    def _publish(self, which: str = "current") -> WeightsHandle:
        """Learner rank 0 puts the full weights (or the anchor) once; a fresh version number."""
        refs = ray.get(self.learner.call("publish_weights", self.cfg.learner.sync_bucket_mb, which))
        self._version += 1
        return WeightsHandle(self._version, refs[0])

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
        }

    def evaluate(self) -> float:
        parts = split(self.test_indices, len(self.rollout))
        results = ray.get(self.rollout.call_each("evaluate", [("test", p, self.weights) for p in parts]))
        return sum(s for s, _ in results) / max(sum(c for _, c in results), 1)

    def search(self, step: int) -> dict[str, float]:
        """EffOPD (validate candidates, accept by the sequential rule) or fixed extrapolation."""
        method = self.cfg.method
        if isinstance(method, FixedExtrapolation):
            k, base, scores = method.k, float("nan"), [float("nan")] * method.k
        else:
            coefs = [0.0] + [coefficient(k) for k in range(1, method.num_candidates + 1)]
            parts = split(list(range(len(coefs))), len(self.evaluators))
            results = ray.get(self.evaluators.call_each(
                "score", [(self._stored(), self.anchor, [coefs[i] for i in p]) for p in parts if p]))
            flat = [s for r in results for s in r]
            base, scores = flat[0], flat[1:]
            k = accept(base, scores, method.comparison)
        if k > 0:
            ray.get(self.learner.call("extrapolate", coefficient(k)))
            self._sync_rollout()
        ray.get(self.learner.call("set_anchor"))
        self.anchor = self._stored()
        decision = Decision(step, base, scores, k, getattr(method, "comparison", "fixed"))
        self.state.decisions.append(decision.to_dict())
        log.info("step %d: %s accepted k=%d (base %.3f, scores %s)", step, method.type, k, base,
                 ", ".join(f"{s:.3f}" for s in scores))
        out = {"effopd/base_score": base, "effopd/accepted_k": float(k)}
        out.update({f"effopd/score_k{i}": s for i, s in enumerate(scores, start=1)})
        return out

    def save(self, step: int) -> None:
        tag = ckpt.tag_for(step)
        root = ckpt.ckpt_root(self.run_dir)
        ray.get(self.learner.call("save_checkpoint", str(root), tag))
        ckpt.write_driver_state(self.run_dir, tag, self.state)
        ckpt.commit(self.run_dir, tag, self.cfg.checkpoint.keep)

    def finish(self) -> None:
        """Final HF checkpoint, decisions and the checkpoint path as MLflow artifacts."""
        from orchestrator.modeling import load_model, load_tokenizer

        final_dir = self.run_dir / "final"
        model = load_model(self.cfg.model_paths[0])
        model.load_state_dict(fetch_state_dict(self._stored()), strict=False)
        model.save_pretrained(final_dir, safe_serialization=True)
        load_tokenizer(self.cfg.model_paths[0]).save_pretrained(final_dir)
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


def sweep_parent_run(sweep: str, plans: list[tuple[ExperimentConfig, ResolvedPlan]]) -> str:
    """The sweep's MLflow parent run (re-used when the sweep is re-run); logs the trial list."""
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
    tracker.close()
    return tracker.run_id


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="opd", unit="step", disable=not enabled, dynamic_ncols=True)
