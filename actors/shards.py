"""A ZeRO-3 model built and loaded rank by rank: no rank ever holds the whole model.

`build_partitioned` constructs the model from its config under `deepspeed.zero.Init` (each module's
parameters are partitioned as soon as the module is built), then `load_partitions` fills every
rank's partitions straight from the checkpoint's safetensors files: ZeRO-3 flattens a parameter of
n elements and gives rank r the elements [r p, min((r + 1) p, n)) with p = ceil(n / W) (its
`ds_tensor`, zero-padded to p), so rank r reads only the rows of each tensor that cover its range,
through a memory map. Host memory per rank: its partitions plus one tensor's rows at a time, instead
of the full model (at 32B, 8 ranks on a node held 8 x 65.6 GB in bf16 before partitioning).
This is the job `HfDeepSpeedConfig` does for `from_pretrained` (OpenRLHF `models/actor.py`), minus
the full-tensor broadcast from rank 0 for every parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def build_partitioned(path: str | Path, ds_config: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """The HF causal LM at `path`, constructed partitioned under `zero.Init` and loaded partition by
    partition from its checkpoint (every rank calls this at once: construction is collective)."""
    import deepspeed
    import torch._dynamo  # noqa: F401 - zero.Init wraps module classes; import what it patches first
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # imported before zero.Init patches classes
    # no random init: every partition is overwritten from the checkpoint below (transformers' init
    # functions would also index the empty placeholders of partitioned parameters)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()  # `init_weights` ties them, and no_init_weights skipped it (tied embeddings: one parameter)
    for buf in model.buffers():  # zero.Init places parameters only (rotary frequencies are buffers)
        buf.data = buf.data.to(device)
    load_partitions(model, path)
    return model


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json (the learner loads "
                                "safetensors checkpoints partition by partition)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def checkpoint_numel(path: str | Path) -> int:
    """Elements of every tensor in the checkpoint, read from the safetensors headers only."""
    import struct

    total, seen = 0, set()
    for name, file in checkpoint_files(path).items():
        if file in seen:
            continue
        seen.add(file)
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total


def load_partitions(model: torch.nn.Module, path: str | Path) -> int:
    """Copy this rank's slice of every checkpoint tensor into its ZeRO-3 partition (`ds_tensor`),
    reading only the rows that cover it. Returns the number of parameters loaded. Raises when a
    parameter is missing from the checkpoint or its shape differs."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight has several names
        names.setdefault(id(p), []).append(name)
    handles: dict[Path, Any] = {}
    try:
        loaded = 0
        for p_name, p in model.named_parameters():  # tied weights appear once
            name = next((n for n in names[id(p)] if n in files), None)
            if name is None:
                raise KeyError(f"{path}: checkpoint has no tensor '{p_name}' (nor any name tied to it)")
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt").__enter__()
            view = handles[file].get_slice(name)
            shape = tuple(view.get_shape())
            if shape != tuple(p.ds_shape):
                raise ValueError(f"{path}: '{name}' has shape {shape} in the checkpoint, {tuple(p.ds_shape)} in the model")
            part = p.ds_tensor
            start = part.ds_numel * _rank_of(p) if hasattr(part, "ds_numel") else 0
            _copy_range(view, shape, start, part)
            loaded += 1
        return loaded
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def _rank_of(p) -> int:
    import torch.distributed as dist

    group = getattr(p, "ds_process_group", None)
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def _copy_range(view, shape: tuple[int, ...], start: int, part: torch.Tensor) -> None:
    """part[:k] <- flat(tensor)[start : start + k], k = what is left of the tensor from `start`."""
    numel = 1
    for d in shape:
        numel *= d
    count = max(0, min(part.numel(), numel - start))
    with torch.no_grad():
        part.zero_()
        if count == 0:
            return
        row = numel // shape[0] if shape else 1
        r0, r1 = start // row, -(-(start + count) // row)
        rows = view[r0:r1] if shape else view[:]
        flat = rows.reshape(-1)[start - r0 * row: start - r0 * row + count]
        part[:count].copy_(flat.to(part.dtype))
