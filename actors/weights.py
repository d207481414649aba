"""Weight handles: how new weights reach rollout workers and evaluators through the object store.

The learner's rank 0 puts the full weights once, in buckets (`Learner.publish_weights`); the
driver hands the same `WeightsHandle` (a version number and the bucket refs) to every worker.
A worker reloads only when its version differs, so a worker that Ray restarted mid-run
(back at W_0) catches up on its next call without any extra bookkeeping.

Loading streams: buckets are fetched one at a time and copied tensor by tensor into the held
model (HF) or into the engine (vLLM: straight into its weight loader when the engine runs in this
process, else through a local safetensors file), so a worker never holds a second full copy of the
weights. EffOPD candidates arrive the same way: the learner forms each one and publishes it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

Named = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightsHandle:
    version: int
    refs: list = field(default_factory=list)
    """ObjectRefs of {name: tensor} buckets; empty for version 0 (the checkpoint on disk)."""


def stream(handle: WeightsHandle) -> Named:
    """(name, tensor) of every weight, fetching one bucket at a time."""
    import ray

    for ref in handle.refs:
        yield from ray.get(ref).items()


def fetch_state_dict(handle: WeightsHandle) -> dict[str, torch.Tensor]:
    """Every weight at once (for the driver's diagnostics; workers use `stream`)."""
    return dict(stream(handle))


class HoldsWeights:
    """Mixin for actors that hold a copy of the student and follow the learner's versions."""

    model: torch.nn.Module
    version: int = 0

    def sync(self, handle: WeightsHandle | None) -> bool:
        """Load `handle` if it is newer than what this actor holds; True when weights changed."""
        if handle is None or handle.version == self.version:
            return False
        if not handle.refs:
            raise RuntimeError(f"weights version {handle.version} are not in the object store (NCCL weight sync): "
                               "a restarted engine cannot rejoin the NCCL group; resume the run instead")
        self.load_stream(stream(handle))
        self.version = handle.version
        return True

    def load_stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights into the held HF model tensor by tensor (the vLLM workers reload their engine)."""
        params = dict(self.model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, tensor in named:
                if name not in params:
                    raise RuntimeError(f"weight sync mismatch: unexpected {name}")
                params[name].copy_(tensor)
                seen.add(name)
        missing = [n for n in params if n not in seen and "rotary" not in n]
        if missing:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:3]}")


# ----------------------------------------------------------------------------- safetensors, streamed
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
           torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def write_safetensors(path: str | Path, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write tensors to a safetensors file one at a time (the header goes last into its reserved
    slot), so only one tensor is in memory. Returns the number of tensors.

    Layout (safetensors spec): u64 little-endian header size N, N bytes of JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} padded with spaces, then the raw data.
    The header size is known only at the end, so the data is written to `path.data` first and the
    file is assembled with one sequential copy."""
    path = Path(path)
    data_path = path.with_suffix(path.suffix + ".data")
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    with open(data_path, "wb") as data:
        for name, tensor in named:
            t = tensor.detach().contiguous().cpu()
            raw = t.reshape(-1).view(torch.uint8).numpy()
            data.write(raw)
            header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.size]}
            offset += raw.size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        while chunk := data.read(64 << 20):
            out.write(chunk)
    os.unlink(data_path)
    return len(header) - 1


def read_safetensors(path: str | Path) -> Named:
    """(name, tensor) from a safetensors file, one tensor at a time (memory-mapped)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def write_pid(cfg: dict, role: str, index: int) -> None:
    """Record this actor's pid under <run_dir>/actors/ (for operators, and the restart tests)."""
    if cfg.get("pid_dir"):
        folder = Path(cfg["pid_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{role}-{index}.pid").write_text(str(os.getpid()))
