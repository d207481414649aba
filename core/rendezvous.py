"""Where placed actors meet: each learner rank's distributed environment and the NCCL weight-sync
layout, from where Ray placed them. Pure functions (no Ray import), so the device check can build a
rank's environment exactly as a run does (`benchmarks/gpu_check.py`)."""

from __future__ import annotations

from typing import Any


def learner_env(places: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rank's distributed environment from the actual placement (rank order = bundle order).

    MASTER_ADDR is rank 0's node address, or 127.0.0.1 when every rank shares rank 0's node (a local
    run: nothing listens beyond loopback). LOCAL_RANK is 0 for every rank: it is the CUDA device
    index DeepSpeed selects (`zero.Init` sets cuda:$LOCAL_RANK), and Ray makes each rank's one GPU
    cuda:0 of that actor (its CUDA_VISIBLE_DEVICES), so a rank's index on its node would be an
    invalid device ordinal for every rank but the first (OpenRLHF sets LOCAL_RANK=0 for the same
    reason). The rank's index among the ranks on its node (told apart by node id: simulated nodes
    share one IP) is NODE_INDEX, and LOCAL_WORLD_SIZE their number there."""
    single_node = len({p["node_id"] for p in places}) == 1
    master = "127.0.0.1" if single_node else places[0]["ip"]
    on_node: dict[str, int] = {}
    envs = []
    for rank, p in enumerate(places):
        index = on_node.get(p["node_id"], 0)
        on_node[p["node_id"]] = index + 1
        envs.append({"RANK": rank, "WORLD_SIZE": len(places), "LOCAL_RANK": 0, "NODE_INDEX": index,
                     "MASTER_ADDR": master, "node_id": p["node_id"]})
    for env in envs:
        env["LOCAL_WORLD_SIZE"] = on_node[env["node_id"]]
    return envs


def nccl_layout(engine_sizes: list[int]) -> tuple[list[int], int]:
    """Weight-sync group ranks: learner rank 0 is rank 0; engine i's TP x PP workers take ranks
    offset_i .. offset_i + size_i - 1 after every earlier engine's workers. Returns (offsets, world size)."""
    offsets, at = [], 1
    for size in engine_sizes:
        offsets.append(at)
        at += size
    return offsets, at
