"""Actor groups: one Ray actor group per role with a plain fan-out API (OpenRLHF-style).

Actor classes stay plain Python; `ray.remote` is applied here, so CPU unit tests can use the
classes directly.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import ray

ACTOR_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DS_ACCELERATOR": "cpu",
    "PYTHONWARNINGS": "ignore",
}


class ActorGroup:
    """`n` actors of `cls`; `call` fans a method out to all of them and returns the refs."""

    def __init__(self, cls: type, n: int, args: Callable[[int], tuple], options: dict[str, Any],
                 placement: tuple[Any, int] | None = None) -> None:
        """`placement` = (placement group, first bundle index): actor i goes to bundle index + i."""
        remote_cls = ray.remote(cls)
        opts = {"runtime_env": {"env_vars": dict(ACTOR_ENV)}, **options}
        self.actors = [remote_cls.options(**opts, **_bundle(placement, i)).remote(*args(i)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_actor_args: list[tuple]) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args)]

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _bundle(placement: tuple[Any, int] | None, i: int) -> dict[str, Any]:
    if placement is None or placement[0] is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg, first = placement
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=first + i)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
