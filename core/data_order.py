"""Which training prompts a step sees (`run.data_order`): a function of (seed, step) alone, so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import functools
import random


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
