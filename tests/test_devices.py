"""The device contract (`actors/devices.py`): an index outside the actor's visible GPUs is refused
where it is asked for, by Foresight's own code and by DeepSpeed's accelerator, as CUDA would refuse
it on a real GPU ("invalid device ordinal")."""

from __future__ import annotations

import pytest

from actors import devices


def test_an_index_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # Ray gave this actor GPU 5 of its node: it is cuda:0 here
    devices.check(0, "rank")
    devices.check("cuda:0", "rank")
    with pytest.raises(devices.DeviceContractError, match="asked for cuda:1, but this actor sees 1 GPU"):
        devices.check("1", "learner rank 1")  # its index on the node, as LOCAL_RANK was before the fix
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    devices.check(1, "tp engine")
    with pytest.raises(devices.DeviceContractError):
        devices.check(2, "tp engine")


def test_cpu_actors_are_not_checked(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    devices.check(7, "cpu actor")
    assert devices.device(0, "cpu actor").type == "cpu"


def test_deepspeed_accelerator_is_guarded_on_a_simulated_gpu(monkeypatch):
    """DeepSpeed's CPU accelerator ignores device indices; guarded, it checks them like CUDA."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    saved = {name: getattr(acc, name) for name in ("set_device", "device_name", "device")}
    try:
        devices.guard_accelerator("learner rank 1")
        acc.set_device(0)
        assert acc.device_name("0") == acc.device_name()
        with pytest.raises(devices.DeviceContractError, match="accelerator.device_name"):
            acc.device_name("1")  # what zero.Init does with LOCAL_RANK=1
    finally:
        for name, fn in saved.items():
            setattr(acc, name, fn)
        acc._foresight_guarded = False
