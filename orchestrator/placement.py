"""Build a trial's actors from its plan: the placement group, one actor group per role, the
learner's rendezvous from where Ray actually placed the ranks, and the NCCL weight-sync layout.

Bundle order is the plan's (`ResolvedPlan.bundles()`): rollout engines, teacher engines, learner
ranks, evaluators. Each actor asks for its role's CPUs and GPUs inside its own bundle, so a
tensor-parallel engine's GPUs sit on one node, and Ray gives every GPU actor its own
`CUDA_VISIBLE_DEVICES`. Nothing else in the project knows the bundle order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from actors.group import ActorGroup
from orchestrator.plan import ResolvedPlan
from core.rendezvous import learner_env, nccl_layout  # noqa: F401 - placed actors' environments

log = logging.getLogger(__name__)


def role_classes() -> dict[str, dict[str, type]]:
    """Backend registries: role -> backend -> actor class (imported on use)."""
    from actors.evaluator import CandidateEvaluator, VllmCandidateEvaluator
    from actors.learner import Learner
    from actors.rollout import RolloutWorker, VllmRolloutWorker
    from actors.teacher import TeacherScorer, VllmTeacherScorer

    return {
        "rollout": {"hf": RolloutWorker, "vllm": VllmRolloutWorker},
        "teacher": {"hf": TeacherScorer, "vllm": VllmTeacherScorer},
        "learner": {"deepspeed": Learner},
        "evaluator": {"hf": CandidateEvaluator, "vllm": VllmCandidateEvaluator},
    }


@dataclass
class TrialActors:
    """The actor groups of one trial, built from its plan."""

    rollout: ActorGroup
    teacher: ActorGroup
    learner: ActorGroup
    evaluators: ActorGroup | None
    pg: Any
    owns_pg: bool
    plan: ResolvedPlan
    classes: dict[str, dict[str, type]]
    routes: dict[str, ActorGroup] = field(default_factory=dict)
    """Multi-teacher runs: `models.teachers` name -> its pool's replicas (`plan.route_pools`)."""

    @classmethod
    def launch(cls, plan: ResolvedPlan, acfg: dict[str, Any], restarts: dict[str, int], pg: Any = None,
               classes: dict[str, dict[str, type]] | None = None) -> "TrialActors":
        """Create (or use) the trial's placement group and every role's actors in it.

        `restarts`: Ray restarts per role (a restarted actor's interrupted call is retried)."""
        from ray.util.placement_group import placement_group

        classes = classes or role_classes()
        owns = pg is None
        if owns:
            pg = placement_group(plan.bundles(), strategy="PACK", name=f"foresight-{plan.run_dir.name}")
            ray.get(pg.ready(), timeout=600)

        def group(role: str, args) -> ActorGroup | None:
            spec = plan.role(role)
            if spec is None or spec.actors == 0:
                return None
            if spec.pool:  # a sweep's shared teacher pool (orchestrator/teacher_pool.py)
                from orchestrator.teacher_pool import ensure

                return ActorGroup.attach(ensure(plan.teacher_pool, classes[role][spec.backend]))
            n = restarts.get(role, 0)
            options = {**spec.options(), "max_restarts": n, "max_task_retries": n}
            return ActorGroup(classes[role][spec.backend], spec.actors, args, options, (pg, plan.first_bundle(role)))

        ws = plan.role("learner").actors
        from orchestrator.teacher_pool import ensure

        routes = {name: ActorGroup.attach(ensure(pool, classes["teacher"][pool.role.backend]))
                  for name, pool in plan.route_pools.items()}
        return cls(rollout=group("rollout", lambda i: (acfg, i)), teacher=group("teacher", lambda i: (acfg, i)),
                   learner=group("learner", lambda r: (r, ws, acfg)), evaluators=group("evaluator", lambda i: (acfg, i)),
                   pg=pg, owns_pg=owns, plan=plan, classes=classes, routes=routes)

    def start_learner_group(self, acfg: dict[str, Any], max_restarts: int) -> tuple[list[dict[str, Any]], int]:
        """Rendezvous and ZeRO-3 set-up of every rank (`start_learners`). A rank that dies here is
        treated as one that dies later: said, and the group recreated, at most `max_restarts` times,
        else LearnerLost. Returns (the ranks' environments, restarts used)."""
        restarts = 0
        while True:
            try:
                return start_learners(self.learner), restarts
            except ray.exceptions.RayActorError as err:
                dead = self.dead_learner_ranks()
                if restarts >= max_restarts:
                    raise LearnerLost(f"learner rank(s) {dead} died during start-up (learner.max_restarts="
                                      f"{max_restarts} restarts used): {str(err).splitlines()[0]}; "
                                      "see the actors' logs, then rerun the same command") from err
                restarts += 1
                log.warning("learner rank(s) %s died during start-up; recreating the learner group (restart %d of %d)",
                            dead, restarts, max_restarts)
                self.replace_learners(acfg)

    def dead_learner_ranks(self) -> list[int]:
        """Ranks that do not answer (dead or wedged: either way the group is gone)."""
        dead = []
        for rank, actor in enumerate(self.learner.actors):
            try:
                ray.get(actor.has_cuda.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                dead.append(rank)
        return dead

    def replace_learners(self, acfg: dict[str, Any]) -> ActorGroup:
        """Kill the learner ranks and create new ones in the same bundles (after a rank died)."""
        group = self.learner
        spec = self.plan.role("learner")
        group.kill()
        ws = spec.actors
        self.learner = ActorGroup(self.classes["learner"][spec.backend], ws, lambda r: (r, ws, acfg),
                                  spec.options(), (self.pg, self.plan.first_bundle("learner")))
        return self.learner

    def groups(self) -> dict[str, ActorGroup]:
        out = {"rollout": self.rollout, "teacher": self.teacher, "learner": self.learner, "evaluator": self.evaluators,
               **{f"teacher:{name}": g for name, g in self.routes.items()}}
        return {role: g for role, g in out.items() if g is not None}

    def placements(self) -> dict[str, list[dict[str, Any]]]:
        """Where every actor runs: node id and IP, the GPUs Ray gave it, CUDA_VISIBLE_DEVICES, pid."""
        groups = self.groups()
        refs = {role: g.call("placement") for role, g in groups.items()}
        return {role: ray.get(r) for role, r in refs.items()}

    def kill(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for g in (self.rollout, self.teacher, self.evaluators, self.learner):
            if g is not None:
                g.kill()
        if self.owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed
                pass


def probe_placements(plan: ResolvedPlan) -> dict[str, list[dict[str, Any]]]:
    """Place the plan's actors as a run would (same placement group, bundles and resources), as
    `PlacementProbe`s that load nothing; report where each landed, then remove them."""
    from actors.group import PlacementProbe

    probes = {role: {backend: PlacementProbe for backend in backends} for role, backends in role_classes().items()}
    own = replace(plan, roles=[r for r in plan.roles if not r.pool], route_pools={})  # shared pools: placed by their sweep
    actors = TrialActors.launch(own, {}, {}, classes=probes)
    try:
        return actors.placements()
    finally:
        actors.kill()


def start_learners(learner: ActorGroup) -> list[dict[str, Any]]:
    """Rendezvous from where Ray placed the ranks: rank 0's node hosts the store (loopback when every
    rank is on that node), each rank learns its local rank on its node; then every rank builds its
    ZeRO-3 engine. Returns the ranks' environments."""
    envs = learner_env(ray.get(learner.call("placement")))
    port = ray.get(learner.actors[0].open_store.remote(envs[0]["MASTER_ADDR"]))
    get_all(learner.call_each("setup", [(env, port) for env in envs]))
    return envs


def get_all(refs: list) -> list:
    """ray.get of every ref, raising as soon as one fails: a dead rank leaves the others waiting in a
    collective (or the rendezvous) until its timeout."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


class LearnerLost(RuntimeError):
    """A learner rank died and the run cannot recreate the group: the message says where to resume."""


class SharedDirError(RuntimeError):
    """The run folder is not one folder on every node the learner ranks run on."""


def check_shared_output(read, envs: list[dict[str, Any]], run_dir) -> None:
    """When the ranks span nodes, each must read a marker the driver just wrote into the run folder
    (ZeRO-3 shards, checkpoints and final weights are written there by every rank, and read back by
    the driver on resume); raise SharedDirError naming the ranks that cannot. `read(path, token)`
    returns, per rank, whether it read `token` from `path` (`Learner.can_read` on every rank)."""
    import uuid
    from pathlib import Path

    if len({e["node_id"] for e in envs}) < 2:
        return
    token = uuid.uuid4().hex
    marker = Path(run_dir).resolve() / f".shared-{token}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
    try:
        seen = read(str(marker), token)
    finally:
        marker.unlink(missing_ok=True)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise SharedDirError(f"run.output_dir: learner rank(s) {blind} cannot read {marker}, which the driver wrote: "
                             "the ranks write ZeRO-3 shards, checkpoints and the final weights into the run folder and "
                             "the driver resumes from it, so it must be one folder every node mounts (e.g. NFS); set "
                             "run.output_dir to an absolute path there")
