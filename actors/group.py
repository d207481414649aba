"""Actor groups: one Ray actor group per role with a plain fan-out API (OpenRLHF-style).

Actor classes stay plain Python; `ray.remote` is applied here, so CPU unit tests can use the
classes directly.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

ACTOR_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}
"""Environment of every actor. DeepSpeed's accelerator is not set here: each learner rank picks
it from the device it has (`actors/learner.py`)."""


class Placed:
    """Mixin: every actor can say where Ray placed it."""

    def placement(self) -> dict[str, Any]:
        """Node id and IP, the GPU ids Ray assigned, CUDA_VISIBLE_DEVICES as this process sees it, pid."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}

    def device_requests(self) -> list[dict[str, Any]]:
        """Every device index this actor's code asked for (`actors.devices`: each was checked against
        its visible GPUs when asked)."""
        from actors import devices

        return devices.requests()

    def timed(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, float]]:
        """`method(*args, **kwargs)` and how long this actor was busy with it: (result, {"busy_s",
        "version"}) where `version` is the student weights version the actor held when it finished
        (rollout workers; 0 for frozen roles). Called with `.options(num_returns=2)`, so the driver
        reads the small second value without fetching the result."""
        import time

        t0 = time.perf_counter()
        result = getattr(self, method)(*args, **kwargs)
        meta = {"busy_s": time.perf_counter() - t0, "version": float(getattr(self, "version", 0))}
        return result, {**meta, **report(method, args, result)}


def report(method: str, args: tuple, result: Any) -> dict[str, float]:
    """Small sums the driver reads beside a call's busy time (per-teacher metrics,
    `orchestrator/routing.py`): a rollout batch's reward sum and rows; a teacher's scores' sum of
    (sampling log-prob - teacher log-prob) over the response tokens, and the tokens."""
    if method == "generate" and isinstance(result, dict) and "rewards" in result:
        return {"reward_sum": float(result["rewards"].sum()), "rows": float(len(result["rewards"]))}
    if method == "score" and args and isinstance(args[0], dict) and "logp" in args[0] and isinstance(result, dict):
        mask = args[0]["response_mask"]
        return {"kl_sum": float(((args[0]["logp"] - result["logp"]) * mask).sum()), "tokens": float(mask.sum())}
    return {}


class PlacementProbe(Placed):
    """Stands in for any actor of a plan when only its placement matters (`foresight plan --probe`,
    the simulated-cluster tests): it asks Ray for the same resources in the same bundle, loads
    nothing, and reports where it was placed."""

    def __init__(self, *args: Any) -> None:
        pass


class ActorGroup:
    """`n` actors of `cls`; `call` fans a method out to all of them and returns the refs."""

    def __init__(self, cls: type, n: int, args: Callable[[int], tuple], options: dict[str, Any],
                 placement: tuple[Any, int] | None = None) -> None:
        """`placement` = (placement group, first bundle index): actor i goes to bundle index + i."""
        import ray

        remote_cls = ray.remote(cls)
        opts = {"runtime_env": {"env_vars": dict(ACTOR_ENV)}, **options}
        self.actors = [remote_cls.options(**opts, **_bundle(placement, i)).remote(*args(i)) for i in range(n)]
        self.owned = True

    @classmethod
    def attach(cls, actors: list) -> "ActorGroup":
        """A group of actors someone else owns (a shared teacher pool's): `kill` leaves them running."""
        group = cls.__new__(cls)
        group.actors, group.owned = list(actors), False
        return group

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_actor_args: list[tuple]) -> list:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args)]

    def kill(self) -> None:
        """Kill the group's actors (an attached group's are only let go)."""
        import ray

        for a in self.actors if self.owned else []:
            ray.kill(a, no_restart=True)
        self.actors = []


def _bundle(placement: tuple[Any, int] | None, i: int) -> dict[str, Any]:
    if placement is None or placement[0] is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg, first = placement
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=first + i)}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split(items: list, n: int) -> list[list]:
    """Split a list into n contiguous, nearly equal parts (earlier parts one longer)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
