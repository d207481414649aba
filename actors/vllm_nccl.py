"""GPU weight sync: learner rank 0 -> running vLLM engines over NCCL (vLLM 0.32 weight-transfer API).

Group layout. One NCCL group (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`, apart from
DeepSpeed's torch.distributed group):
  * rank 0 is learner rank 0, the only sender. It holds the full weights gathered from ZeRO-3 and
    hosts the TCPStore, so `master_address`/`master_port` are its host and a free port there.
  * ranks 1.. are the workers of every engine. Engine i (one `vllm.LLM` with TP x PP workers) gets
    `rank_offset = 1 + sum of the sizes of engines 0..i-1`. vLLM ranks its workers from there.
  * world_size = 1 + sum over engines of TP x PP (TP alone when there is no pipeline parallelism).

Call order:
  1. Build each engine with `vllm.LLM(..., **engine_kwargs(cfg_rollout))`.
  2. Once: run `engine_init` on every rollout actor and `TrainerSender(...)` on learner rank 0 at the
     same time. Each side blocks until all `world_size` ranks have joined, within the TCPStore
     timeout (300 s).
  3. Per update: learner rank 0 computes `meta = TrainerSender.meta(...)` and sends it to the
     actors. Then `engine_receive(llm, meta)` on every actor runs at the same time as
     `sender.send(...)`. Wait for all of them. The tensors given to `send` must match `meta`
     exactly: the same names in the same order, the same dtypes and shapes.
Tensors are packed into buckets of `bucket_bytes` (vLLM `packed_tensor`) and sent in turn over
`NUM_BUFFERS` streams. Each side cuts bucket boundaries from its own byte budget, so `engine_init`
must get the same `bucket_bytes` as `TrainerSender`. If they differ, the transfer hangs or loads
corrupt weights. Each engine also allocates NUM_BUFFERS x ~bucket_bytes of receive buffers beyond
its gpu_memory_utilization share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm import LLM

DEFAULT_BUCKET_BYTES = 64 << 20
"""Bucket size when `engine_init` is not given one. It equals the default learner.sync_bucket_mb (64)."""
NUM_BUFFERS = 2
"""Buffers in flight on each side (double buffering). Sender and receivers must use the same count."""

Meta = list[tuple[str, str, list[int]]]


def engine_kwargs(cfg_rollout: dict[str, Any]) -> dict[str, Any]:
    """Extra kwargs for `vllm.LLM(...)` so the engine can receive NCCL weight updates.

    Returns a plain dict, so it pickles and needs no vllm import. `EngineArgs` turns it into a
    `WeightTransferConfig`. `cfg_rollout` is unused for now: the NCCL backend has no engine-side options.
    """
    del cfg_rollout
    return {"weight_transfer_config": {"backend": "nccl"}}


def engine_init(llm: LLM, master_address: str, master_port: int, rank_offset: int, world_size: int,
                *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Engine side, inside the rollout actor: join every worker of `llm` to the group.

    The workers take ranks `rank_offset .. rank_offset + TP*PP - 1`. The call blocks until the
    trainer (rank 0) and all other engines join, so launch it at the same time as `TrainerSender`.
    `bucket_bytes` must equal the trainer's.
    """
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={
        "master_address": master_address, "master_port": master_port,
        "rank_offset": rank_offset, "world_size": world_size,
        "packed": True, "packed_buffer_size_bytes": bucket_bytes, "packed_num_buffers": NUM_BUFFERS,
    }))


def engine_receive(llm: LLM, meta: Meta) -> None:
    """Engine side: receive one full update described by `meta` and load it into the model.

    Runs vLLM's start_weight_update -> update_weights -> finish_weight_update sequence. The
    update_weights step holds the NCCL broadcasts, so this call must run at the same time as
    `TrainerSender.send`. Afterwards the prefix cache is cleared, because its KV entries were
    computed with the old weights. No generation may run on `llm` meanwhile.
    """
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    update_info = {"names": [name for name, _, _ in meta], "dtype_names": [dtype for _, dtype, _ in meta],
                   "shapes": [list(shape) for _, _, shape in meta]}
    llm.start_weight_update()
    llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
    llm.finish_weight_update()
    llm.reset_prefix_cache()


class TrainerSender:
    """Learner rank 0 side: the group's rank 0 and its only sender.

    Set the CUDA device first (`torch.cuda.set_device`): the communicator binds to the current
    device. The constructor blocks until every engine worker joins (see `engine_init`).
    """

    def __init__(self, master_address: str, master_port: int, world_size: int, bucket_bytes: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.bucket_bytes = int(bucket_bytes)
        self.group: Any = trainer_init(
            {"master_address": master_address, "master_port": master_port, "world_size": world_size}, rank=0)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one full update in buckets. Run it at the same time as `engine_receive` on every engine.

        `named_tensors` are full (gathered) CUDA tensors. They may come one at a time from a
        generator, but each must keep its values until `send` returns; clone anything that lives in
        a reused gather buffer. The order, dtypes and shapes must match `meta`. Returns once the
        bytes have left this GPU.
        """
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        torch.cuda.current_stream().synchronize()  # e.g. the optimizer step writing the weights
        packed_nccl_broadcast_producer(
            iterator=iter(named_tensors), group=self.group, src=0, post_iter_func=lambda item: item[1],
            buffer_size_bytes=self.bucket_bytes, num_buffers=NUM_BUFFERS)
        torch.cuda.current_stream().synchronize()

    @staticmethod
    def meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Meta:
        """(name, dtype name such as 'bfloat16', full shape) for each tensor, in order.

        A ZeRO-3 partitioned parameter reports its full `ds_shape`, so this can read the module's
        parameters without gathering them. The dtype must be the one `send` will actually send.
        """
        return [(name, str(t.dtype).removeprefix("torch."), list(getattr(t, "ds_shape", t.shape)))
                for name, t in named_tensors]

    def close(self) -> None:
        """Destroy the communicator. The engines keep theirs until vLLM shuts down."""
        if self.group is not None:
            self.group.destroy()
            self.group = None
