"""Fault injection for the tests (not a config key users see): `FORESIGHT_FAULTS` lists faults
and the steps they fire at, e.g. `nan_teacher:5` or `nan_teacher:3-` (step 3 and every later one).

    nan_teacher   the learner sees NaN teacher log-probs at one position of that step's batch
    kill_in_save  the driver SIGKILLs its process group after the ranks wrote that step's checkpoint
                  files and before the checkpoint is committed (a torn checkpoint)
    learner_dies_in_setup  learner rank N (`learner_dies_in_setup:N`) exits during its first ZeRO-3
                  set-up of the run (once: a marker in the run's actor folder)

Actors inherit the variable from the process that started the local Ray cluster."""

from __future__ import annotations

import os


def fires(fault: str, step: int) -> bool:
    for item in filter(None, os.environ.get("FORESIGHT_FAULTS", "").split(",")):
        name, _, steps = item.partition(":")
        if name.strip() != fault:
            continue
        lo, dash, hi = steps.partition("-")
        if (dash and int(lo) <= step and (not hi or step <= int(hi))) or (not dash and step == int(lo)):
            return True
    return False


def once(name: str, folder: str | os.PathLike | None) -> bool:
    """True the first time `name` is claimed in `folder` (an O_EXCL marker file), False after."""
    if folder is None:
        return False
    os.makedirs(folder, exist_ok=True)
    try:
        os.close(os.open(os.path.join(folder, f".fault-{name}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
