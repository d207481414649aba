"""The device contract: every device index code asks for exists among the devices Ray gave the actor.

Ray gives an actor with `num_gpus = n` its GPUs by setting CUDA_VISIBLE_DEVICES to their ids on the
node (e.g. "5"), so inside the actor they are cuda:0 .. cuda:n-1, whatever their ids. Code that asks
for cuda:k with k >= n (a learner rank using its index on the node as the device: DeepSpeed's
`zero.Init` calls `set_device(LOCAL_RANK)`) dies on a real GPU with "invalid device ordinal".

On a simulated GPU cluster (Ray declares GPUs, torch sees none) nothing would fail: the models
compute on CPU and DeepSpeed's CPU accelerator ignores device indices. `guard_accelerator` makes
DeepSpeed's accelerator check every index it is asked for, and `device()` checks the index wherever
Foresight itself picks a device, so a defect of that kind fails a CPU test as it would fail a GPU
run. Every choice is recorded (`requests()`), so tests can also see which device each actor asked for.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

_REQUESTS: dict[tuple[str, int], dict[str, Any]] = {}


class DeviceContractError(RuntimeError):
    """Code asked for a device index that this actor does not have."""


def visible() -> list[str]:
    """The GPU ids Ray made visible to this process (CUDA_VISIBLE_DEVICES); [] in a CPU actor."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [v for v in value.split(",") if v.strip()] if value else []


def is_gpu_actor() -> bool:
    """Ray gave this actor GPUs (real, or declared on a simulated cluster)."""
    return bool(visible()) or torch.cuda.is_available()


def check(index: Any, who: str) -> None:
    """Raise DeviceContractError unless device `index` (an int, "3", "cuda:3" or a torch.device)
    exists among this actor's visible GPUs. Indices are not checked in CPU-only actors."""
    k = _index(index)
    if k is None:
        return
    devices = visible() if visible() else [str(i) for i in range(torch.cuda.device_count())]
    _REQUESTS.setdefault((who, k), {"who": who, "index": k, "visible": list(devices)})  # distinct requests only
    if devices and not 0 <= k < len(devices):
        raise DeviceContractError(
            f"{who} asked for cuda:{k}, but this actor sees {len(devices)} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')}): Ray numbers an actor's GPUs from 0, so cuda:{k} is an "
            "invalid device ordinal here")


def device(index: int = 0, who: str = "actor") -> torch.device:
    """The device an actor's model lives on: cuda:index after checking the contract, or the CPU when
    torch sees no CUDA device (a CPU scale, or a simulated GPU cluster: the check still runs)."""
    if is_gpu_actor():
        check(index, who)
    return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(dev: torch.device, wanted: str = "auto") -> torch.dtype:
    """The dtype a model computes in: bf16 on CUDA (the checkpoints' dtype at 1.5B-32B), fp32 on CPU,
    unless `wanted` is `bf16` or `fp32`."""
    if wanted == "bf16" or (wanted == "auto" and dev.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def requests() -> list[dict[str, Any]]:
    """Every device index this process asked for so far (who, index, visible GPUs)."""
    return list(_REQUESTS.values())


def guard_accelerator(who: str) -> None:
    """Make DeepSpeed's accelerator check the device contract on every index it is given (its
    `set_device`, `device_name` and `device`), on CUDA and on the CPU accelerator of a simulated
    GPU actor alike. Call before `deepspeed.initialize` / `zero.Init`."""
    if not is_gpu_actor():
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if getattr(acc, "_foresight_guarded", False):
        return
    for name in ("set_device", "device_name", "device"):
        original = getattr(acc, name)

        def guarded(index=None, _original=original, _name=name):
            check(index, f"{who} (DeepSpeed accelerator.{_name})")
            return _original(index) if index is not None or _name == "set_device" else _original()

        setattr(acc, name, guarded)
    acc._foresight_guarded = True


def _index(index: Any) -> int | None:
    if index is None:
        return None
    if isinstance(index, torch.device):
        return None if index.type != "cuda" else (index.index or 0)
    if isinstance(index, str):
        text = index.strip()
        if text in ("cpu", ""):
            return None
        text = text.removeprefix("cuda:").removeprefix("cuda")
        return int(text) if text.lstrip("-").isdigit() else 0
    return int(index)
