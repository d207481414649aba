"""Learner: one DeepSpeed ZeRO-3 data-parallel rank per Ray actor (gloo on CPU, NCCL on GPU).

Every public method is collective: the driver calls it on all ranks at once
(`LearnerGroup` in `actors/group.py`). Rank r trains on rows [r*B/W, (r+1)*B/W) of the step's
batch; DeepSpeed averages gradients across ranks, and the loss is normalised by the global
token count so the result is the global token mean.

EffOPD state is partition-local: `anchor[i]` is this rank's fp32 copy of its slice of flat
group i (1/W of the model per rank). A jump W <- W + c (W - anchor) is applied in place to the
fp32 master partitions and copied into the working partitions (the ZeRO-3 `ds_tensor`s), so no
parameter is gathered.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from actors.group import Placed
from actors.batching import fetch_rows
from core.faults import fires, once
from core.extrapolation import (DIRECTION_GROUPS, direction_group, direction_metrics, extrapolate, extrapolated,
                                leading_triple)
from core.modeling import quiet_hf

log = logging.getLogger(__name__)


SMALL_MODEL = 10_000_000
"""Parameters below which every tensor is partitioned (persistence thresholds 0): a tiny model's
tensors are all below DeepSpeed's default threshold, and it would not be partitioned at all."""
DS_PERSISTENCE = 100_000
"""DeepSpeed's default `stage3_param_persistence_threshold` (elements): norms and biases stay gathered
instead of being re-gathered in every forward, backward and recompute."""


def ds_config(lc: dict[str, Any], cuda: bool, params: int | None = None) -> dict[str, Any]:
    """The learner's ZeRO-3 config; compiles no op.

    Optimizer: torch AdamW (no DeepSpeed JIT op), its fused multi-tensor kernel on CUDA. Precision
    (`learner.dtype`): bf16 working weights and activations with fp32 master weights, Adam states and
    gradient accumulation (`grad_accum_dtype`: micro-batch gradients add up in an fp32 partition
    buffer; `auto` on CUDA), or fp32 throughout (`auto` on CPU). Tensors of at most `DS_PERSISTENCE`
    elements stay gathered (DeepSpeed's default) unless the model has fewer than `SMALL_MODEL`
    parameters (`params`; None: a small model), where everything is partitioned."""
    bf16 = lc["dtype"] == "bf16" or (lc["dtype"] == "auto" and cuda)
    adam = {"lr": lc["lr"], "betas": list(lc["betas"]), "eps": 1e-8, "weight_decay": lc["weight_decay"], "torch_adam": True}
    if cuda:
        adam["fused"] = True
    persist = DS_PERSISTENCE if params is not None and params >= SMALL_MODEL else 0
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc["grad_clip"],
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": persist,
            "stage3_model_persistence_threshold": persist if persist == 0 else 2**63 - 1,
        },
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


class Learner(Placed):
    """One ZeRO-3 rank. Plain Python; `ray.remote(Learner)` is applied in `actors/group.py`."""

    # set in __init__
    rank: int
    world_size: int
    cfg: dict[str, Any]
    # set in setup()
    engine: Any
    anchor: list[torch.Tensor] | None
    direction: list[torch.Tensor] | None
    """Delta_{n-1} = W - anchor at the last search, this rank's partitions in the working dtype
    (`direction_stats`; a diagnostic: bf16's 2^-8 relative rounding moves a cosine by < 1e-2)."""

    def __init__(self, rank: int, world_size: int, cfg: dict[str, Any]) -> None:
        from actors import devices
        from actors.weights import write_pid

        quiet_hf()
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        torch.set_num_threads(1)
        self.engine, self.anchor, self.direction, self._listen = None, None, None, None
        self._moves, self._rank1_cache = 0, None  # weight/anchor changes; `_rank1`'s cache of them
        self.senders: dict[str, Any] = {}  # rank 0: NCCL weight-transfer groups by name (GPU, vLLM engines)
        self.cuda = torch.cuda.is_available()
        # the one GPU Ray made visible to this rank is cuda:0 (checked against CUDA_VISIBLE_DEVICES)
        self.device = devices.device(0, f"learner rank {rank}")
        # DeepSpeed's accelerator follows the device this actor has (a GPU plan on a machine whose
        # torch sees no CUDA device, e.g. a simulated GPU cluster, computes on CPU)
        os.environ["DS_ACCELERATOR"] = "cuda" if self.cuda else "cpu"
        write_pid(cfg, "learner", rank)
        if not self.cuda and devices.visible():
            log.warning("learner rank %d: Ray assigned GPU(s) %s but torch sees no CUDA device: computing on CPU",
                        rank, os.environ["CUDA_VISIBLE_DEVICES"])

    # ------------------------------------------------------------------ lifecycle
    def open_store(self, host: str) -> int:
        """Rank 0: listen for the rendezvous on `host` only (127.0.0.1 for a single-node run, the node's
        address on a cluster) and return the port. The TCPStore server takes over this socket, so
        nothing listens on other interfaces (torch's own TCPStore would bind all of them)."""
        import socket

        self._listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind((host, 0))
        self._listen.listen(max(128, self.world_size))
        return self._listen.getsockname()[1]

    def setup(self, env: dict[str, Any], port: int) -> int:
        """Join the process group (rendezvous at rank 0's store) and build the ZeRO-3 engine.

        `env`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR from where Ray placed
        the ranks (`orchestrator.placement.learner_env`; LOCAL_RANK is 0: the index of this rank's
        one GPU among the devices Ray made visible to it, which DeepSpeed's `zero.Init` sets as the
        device). The model is built partitioned and each rank loads only its shard
        (`actors.shards`). Returns the model's parameter count."""
        import datetime
        from types import SimpleNamespace

        import torch.distributed as dist

        if fires("learner_dies_in_setup", self.rank) and once("learner_dies_in_setup", self.cfg.get("pid_dir")):
            os._exit(1)  # test hook: this rank dies before the rendezvous completes
        from actors import devices
        from actors.shards import build_partitioned, checkpoint_numel

        _skip_muon_import()
        with _without_mlflow():
            import deepspeed
            import deepspeed.ops

        os.environ.update({k: str(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")})
        os.environ["MASTER_PORT"] = str(port)
        devices.guard_accelerator(f"learner rank {self.rank}")  # every device index DeepSpeed asks for is checked
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT compile
        backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(self.device)
        if env["MASTER_ADDR"] == "127.0.0.1":  # one node: gloo's pair sockets on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.TCPStore(env["MASTER_ADDR"], port, self.world_size, is_master=self.rank == 0,
                              timeout=datetime.timedelta(minutes=10),
                              master_listen_fd=self._listen.detach() if self.rank == 0 else None)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=30))
        deepspeed.init_distributed(dist_backend=backend)  # wraps the group above
        torch.manual_seed(self.cfg["seed"])
        lc = self.cfg["learner"]
        config = ds_config(lc, self.cuda, checkpoint_numel(self.cfg["student_path"]))
        self.dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
        model = build_partitioned(self.cfg["student_path"], config, self.dtype, self.device)
        model.train()
        if lc["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, *_ = deepspeed.initialize(
            args=SimpleNamespace(device_rank=0, local_rank=int(env["LOCAL_RANK"])),
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config,
        )
        return sum(p.ds_numel for p in self.engine.module.parameters())

    def can_read(self, path: str, token: str) -> bool:
        """Whether this rank sees the file `path` with content `token` (the shared-folder check)."""
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    def has_cuda(self) -> bool:
        return self.cuda

    def rendezvous(self) -> dict[str, str]:
        """The distributed environment this rank runs with (for checks)."""
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
        return {k: os.environ.get(k, "") for k in keys}

    # ------------------------------------------------------------------ training
    def train_step(self, parts: list, spec: dict[str, Any], step: int = 0) -> dict[str, float]:
        """One optimizer step on this rank's rows [r B / W, (r + 1) B / W) of the global batch.

        `parts`: (rollout ref, teacher ref, rows) of every rollout part in batch order; this rank
        fetches only the parts its rows overlap (`actors.batching.fetch_rows`), then `train_on`."""
        import time

        B = sum(int(n) for _, _, n in parts)
        lo, hi = self.rank * B // self.world_size, (self.rank + 1) * B // self.world_size
        batch, x = fetch_rows(parts, lo, hi, self.cfg["rollout"]["samples_per_prompt"], self.cfg["loss"])
        # every rank has its rows: the ranks' first collective would otherwise wait for the slowest
        # rank's parts (a later teacher call) inside what is timed as the learner's own work
        self._all_reduce(torch.zeros(1), "sum")
        t0 = time.perf_counter()  # busy from here: the wait for the rollout and teacher parts is theirs
        if fires("nan_teacher", step):  # test hook: one corrupted teacher score, whatever the loss reads
            for name in ("teacher_logp_BR", "teacher_logp_BRV", "teacher_topk_logp_BRK"):
                if getattr(x, name) is not None:
                    setattr(x, name, getattr(x, name).clone())
                    getattr(x, name)[0, 0] = float("nan")
        out = self.train_on(batch, x, spec, step, global_rows=B, first_row=lo)
        return {**out, "busy_s": time.perf_counter() - t0}

    def train_on(self, batch: dict[str, Any], x, spec: dict[str, Any], step: int = 0, global_rows: int | None = None,
                 first_row: int = 0) -> dict[str, float]:
        """One optimizer step on this rank's rows (`batch`: the rollout layout; `x`: the per-token
        loss inputs, `core.losses.TokenBatch`). The rows are packed into micro-batches of at
        most `learner.max_tokens_per_gpu` tokens, each cut to its own width (`actors.batching`; every
        rank runs the same number, padding with empty ones, because ZeRO-3 gathers parameters
        collectively), gradients accumulate into one optimizer step, and each micro-batch's logits
        exist one sequence chunk at a time (`learner.logit_chunk_tokens`, recomputed in backward).
        Returns token-sum statistics, and the tokens computed (`padded_tokens`) beside the real ones.

        A non-finite loss or gradient (a NaN teacher score, a bf16 overflow) gives a non-finite
        global gradient norm, computed across ranks: ZeRO-3 then skips the optimizer step on every
        rank (weights and Adam states untouched); `skipped` reports it."""
        from actors.batching import micro_batches, row_lengths, trimmed
        from core.losses import STAT_KEYS, LossSpec

        lcfg = self.cfg["loss"]
        rows = batch["input_ids"].shape[0]
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        x = x.map(lambda t: t.to(self.device))
        if lcfg["token_keep"] < 1.0:
            x.keep_BR = self._global_keep(x, global_rows or rows, first_row, lcfg, step)
        norm = float(self._all_reduce(x.mask_BR.sum(), "sum")) / self.world_size
        micro = micro_batches(*row_lengths(batch), self.cfg["learner"]["max_tokens_per_gpu"])
        n = int(self._all_reduce(torch.tensor(len(micro), device=self.device), "max"))
        loss_spec = LossSpec(**spec)
        stats = torch.zeros(len(STAT_KEYS), device=self.device)
        padded = real = 0
        for i in range(n):
            mb, xs = trimmed(batch, x, micro[i] if i < len(micro) else [0])  # an empty one keeps the collectives in step
            self.engine.set_gradient_accumulation_boundary(i == n - 1)
            total, st = self._forward_loss(loss_spec, mb, xs)
            weight = 1.0 if i < len(micro) else 0.0
            self.engine.backward(total * (weight / norm), scale_wrt_gas=False)
            stats += st * weight
            if weight:
                padded += mb["input_ids"].numel()
                real += int(mb["attention_mask"].sum())
        self.engine.step()
        self._moves += 1
        out = dict(zip(STAT_KEYS, stats.tolist()))
        out["skipped"] = 0.0 if self.engine.was_step_applied() else 1.0
        out["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["reward_sum"] = float(batch["rewards"].sum())
        if "chunks" in batch:  # a cross-tokenizer teacher's alignment
            out["cross_chunks_sum"], out["cross_split_sum"] = float(batch["chunks"].sum()), float(batch["split"].sum())
        out["sequences"] = float(rows)
        out["micro_batches"] = float(len(micro))
        out["padded_tokens"], out["real_tokens"] = float(padded), float(real)
        return out

    def _forward_loss(self, spec, mb: dict, xs):
        """Loss terms (sum, with grad) and statistics of one trimmed micro-batch, logits one chunk at a time."""
        from torch.utils.checkpoint import checkpoint

        from core.modeling import position_ids

        ids, att, P = mb["input_ids"], mb["attention_mask"], mb["prompt_len"]
        captured: dict[str, torch.Tensor] = {}
        handle = self.engine.module.get_decoder().register_forward_hook(
            lambda _m, _i, out: captured.update(h=out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
        try:  # the LM head runs on one position here; the response positions get it chunk by chunk below
            self.engine(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False,
                        logits_to_keep=1)
        finally:
            handle.remove()
        hidden = captured["h"][:, P - 1 : -1]  # position P + j - 1 predicts response token j
        R = hidden.shape[1]
        step = max(1, self.cfg["learner"]["logit_chunk_tokens"] // max(ids.shape[0], 1))
        total, stats = 0.0, 0.0
        for j0 in range(0, R, step):
            t, st = checkpoint(self._chunk_terms, spec, hidden[:, j0 : j0 + step], xs.positions(j0, j0 + step),
                               use_reentrant=False)
            total, stats = total + t, stats + st
        return total, stats

    def _chunk_terms(self, spec, hidden, x):
        from core.losses import token_terms

        return token_terms(spec, self.engine.module.lm_head(hidden), x)

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as dist

        t = value.detach().to(self.device, torch.float64 if op == "sum" else torch.int64).clone()
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def _global_keep(self, x, B: int, lo: int, lcfg: dict, step: int) -> torch.Tensor:
        """Token sparsification over the whole batch: every rank gathers the [B, R] masks and KL
        scores (r_t - q_t), selects with the same seed, and keeps its own rows."""
        from core.losses import sparsify

        mask = self._gather_rows(x.mask_BR, B)
        score = self._gather_rows(x.rollout_logp_BR - x.teacher_logp_BR, B)
        keep = sparsify(mask.cpu(), score.cpu(), lcfg["token_keep"], lcfg["token_select"],
                        seed=self.cfg["seed"] * 1_000_003 + step)
        b, R = x.mask_BR.shape
        return keep[lo : lo + b, :R].to(self.device)

    def _gather_rows(self, t_BR: torch.Tensor, B: int) -> torch.Tensor:
        """[B, R_max] from every rank's [b_r, R_r] rows, in rank order (zero-padded)."""
        import torch.distributed as dist

        if self.world_size == 1:
            return t_BR
        W = self.world_size
        R = int(self._all_reduce(torch.tensor(t_BR.shape[1]), "max"))
        rows = -(-B // W)
        buf = torch.zeros(rows, R, device=self.device, dtype=torch.float32)
        buf[: t_BR.shape[0], : t_BR.shape[1]] = t_BR
        out = [torch.zeros_like(buf) for _ in range(W)]
        dist.all_gather(out, buf)
        return torch.cat([o[: (r + 1) * B // W - r * B // W] for r, o in enumerate(out)])

    # ------------------------------------------------------------------ controls
    def set_grad_projection(self, bases_ref: list) -> int:
        """Project every listed weight's gradient onto its basis: g <- g V V^T (V: [in, K]).

        The hook sees each rank's local (pre-reduction) gradient; projection is linear, so the
        averaged gradient is projected too. Returns the number of hooked matrices.
        """
        if isinstance(bases_ref, list):  # [ObjectRef], put once by the driver
            import ray

            bases = ray.get(bases_ref[0])
        else:
            bases = bases_ref
        hooked = 0
        for name, p in self.engine.module.named_parameters():
            v = bases.get(name)
            if v is None:
                continue
            v = v.to(self.device, torch.float32)  # the gradient's device (CUDA on GPUs)
            p.register_hook(lambda g, v=v: (g.float() @ v @ v.T).to(g.dtype))
            hooked += 1
        return hooked

    # ------------------------------------------------------------------ weights
    def _buckets(self, bucket_mb: float) -> list[list[tuple[str, torch.nn.Parameter]]]:
        """Parameters grouped into buckets of about `bucket_mb` MB of fp32 (full size)."""
        buckets, current, size, limit = [], [], 0, bucket_mb * 2**20
        for name, p in self.engine.module.named_parameters():
            current.append((name, p))
            size += p.ds_numel * 4
            if size >= limit:
                buckets.append(current)
                current, size = [], 0
        return buckets + ([current] if current else [])

    def _put_full(self, bucket_mb: float) -> list | None:
        """Gather one bucket at a time (one collective each); rank 0 puts it in the object store in the
        working dtype (bf16 on GPUs: what the engines hold, half the bytes of fp32)."""
        import deepspeed
        import ray

        self._release_gathered()
        refs: list | None = [] if self.rank == 0 else None
        for bucket in self._buckets(bucket_mb):
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                if refs is not None:
                    refs.append(ray.put({name: p.detach().to("cpu", copy=True) for name, p in bucket}))
        return refs

    def _gathered(self, bucket_mb: float):
        """(name, full tensor) of every weight; every rank must iterate (one collective per bucket)."""
        import deepspeed

        self._release_gathered()
        for bucket in self._buckets(bucket_mb):
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                for name, p in bucket:
                    yield name, p.detach().to("cpu", copy=True)

    def save_hf(self, out_dir: str) -> None:
        """The current weights as an HF checkpoint: rank 0 writes model.safetensors tensor by tensor
        (model dtype) and copies the student's config and tokenizer files; all ranks gather."""
        import shutil

        from actors.weights import write_safetensors

        named = self._gathered(self.cfg["learner"]["sync_bucket_mb"])
        if self.rank != 0:
            for _ in named:
                pass
            return
        out, src = Path(out_dir), Path(self.cfg["student_path"])
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".safetensors.index.json")):
                shutil.copy2(f, out / f.name)
        write_safetensors(out / "model.safetensors", named)

    def publish_weights(self, bucket_mb: float, which: str = "current", coef: float = 0.0,
                        params: str = "all") -> list | None:
        """Put the full weights in the object store once, in buckets, in the working dtype: the current
        weights, an EffOPD `candidate` W + coef (W - anchor) formed on the fp32 master partitions (see
        `candidate_partitions`), or the `anchor` (diagnostics).

        Returns on rank 0 a list of ObjectRefs, each a {name: tensor} dict of about `bucket_mb`
        MB; None on other ranks. Rollout workers and evaluators `ray.get` the buckets; the
        driver passes the same refs to all of them (put once, not per worker).
        """
        return self._as(which, coef, lambda: self._put_full(bucket_mb), params)

    def gathered_state(self, which: str = "current", coef: float = 0.0, params: str = "all") -> dict[str, torch.Tensor] | None:
        """The full weights as `publish_weights` would publish them, as a dict on rank 0 (None elsewhere),
        without the object store (the device check runs without Ray); every rank must call."""
        def collect():
            full = dict(self._gathered(self.cfg["learner"]["sync_bucket_mb"]))
            return full if self.rank == 0 else None

        return self._as(which, coef, collect, params)

    def _as(self, which: str, coef: float, fn, params: str = "all"):
        """fn() on the current weights, the `anchor`, or the `candidate` W + coef (W - anchor)."""
        if which == "anchor":
            return self._with_working(lambda i, lo, hi: self.anchor[i][lo:hi], fn)
        if which == "candidate":
            return self._with_working(self._candidate(coef, params), fn)
        return fn()

    # ------------------------------------------------------------------ GPU: NCCL to vLLM engines
    def nccl_endpoint(self) -> tuple[str, int]:
        """(node IP, free port) for the weight-transfer group's rendezvous, hosted by rank 0."""
        import ray

        from actors.group import free_port

        return ray.util.get_node_ip_address(), free_port()

    def nccl_open(self, address: str, port: int, world_size: int, bucket_bytes: int,
                  group: str = "rollout") -> list | None:
        """Rank 0 joins weight-transfer `group` as its sender (blocks until every engine joins);
        returns the update's metadata (name, dtype, full shape), in send order. Groups: `rollout`
        (every rollout engine) and `evaluator` (every dedicated evaluator engine): an engine is in
        one group (vLLM keeps one weight-transfer engine per worker)."""
        if self.rank != 0:
            return None
        from actors.vllm_nccl import TrainerSender

        self.senders[group] = TrainerSender(address, port, world_size, bucket_bytes)
        return self.nccl_meta()

    def nccl_meta(self) -> list:
        """(name, dtype, full shape) of every weight in the order `nccl_send` sends them."""
        from actors.vllm_nccl import TrainerSender

        return TrainerSender.meta([item for bucket in self._buckets(self.cfg["learner"]["sync_bucket_mb"])
                                   for item in bucket])

    def nccl_send(self, group: str = "rollout", which: str = "current", coef: float = 0.0, params: str = "all") -> None:
        """Every rank gathers the same buckets (ZeRO-3 collectives); rank 0 broadcasts each gathered
        tensor on `group` (vLLM packs them into `bucket_bytes` buffers). `which`/`coef` as in
        `publish_weights`: an EffOPD candidate is formed on the fp32 master partitions and sent once,
        in the working dtype, straight from the gather (no object store, no file)."""
        return self._as(which, coef, lambda: self._nccl_send(self.senders[group] if self.rank == 0 else None), params)

    def _nccl_send(self, sender) -> None:
        import deepspeed

        self._release_gathered()

        def gathered():
            for bucket in self._buckets(self.cfg["learner"]["sync_bucket_mb"]):
                with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                    for name, p in bucket:
                        yield name, p.detach().clone()  # the gather buffer is released on exit

        if sender is not None:
            sender.send(gathered())
        else:
            for _ in gathered():
                pass

    # ------------------------------------------------------------------ EffOPD (partition-local)
    def _release_gathered(self) -> None:
        """Re-partition parameters a no-grad forward left gathered (`engine.empty_partition_cache`
        without its gc.collect(), which costs ~0.3 s per call in a process this size)."""
        self.engine.optimizer.empty_partition_cache()

    def _flats(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        opt = self.engine.optimizer
        return opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat

    def _with_working(self, values, fn):
        """Run fn() with the working partitions temporarily set to `values(i, lo, hi)` (fp32 values of
        flat group i, elements lo:hi, cast to the working dtype as the optimizer casts its masters),
        then restore them from the masters."""
        masters, working = self._flats()
        self._release_gathered()  # persistent parameters too: the next gather reads the edited partitions
        for i, w in enumerate(working):
            for lo, hi in _slices(w.numel()):
                w.data[lo:hi].copy_(values(i, lo, hi))
        try:
            return fn()
        finally:
            self._release_gathered()
            for w, m in zip(working, masters):
                w.data.copy_(m)

    def _candidate(self, coef: float, params: str = "all"):
        """The fp32 values of W + coef (W - anchor) on this rank's partitions, slice by slice. `params`
        (`method.params`): `all` | `attn_mlp`, where the parameters the authors' rule leaves out keep W
        (`_kept`); a `:rank1` suffix: every matrix takes W + coef s1 u1 v1^T instead (`_rank1`)."""
        masters, _ = self._flats()
        names, _, subspace = params.partition(":")
        kept = self._kept(names)
        rank1 = self._rank1(names) if subspace == "rank1" else {}

        def values(i: int, lo: int, hi: int) -> torch.Tensor:
            out = extrapolate(masters[i].data[lo:hi], self.anchor[i][lo:hi], coef)
            for (gi, a), (u, sigma, v, first, count, cols) in rank1.items():
                x, y = max(a, lo), min(a + count, hi)
                if gi != i or x >= y:
                    continue
                e = torch.arange(first + x - a, first + y - a, device=u.device)
                step = (coef * sigma) * u[e // cols] * v[e % cols]
                out[x - lo:y - lo] = masters[i].data[x:y] + step.to(out.dtype)
            for start, end in kept[i]:
                if start < hi and end > lo:
                    a, b = max(start, lo), min(end, hi)
                    out[a - lo:b - lo] = masters[i].data[a:b]
            return out

        return values

    def _param_ranges(self) -> list[list[tuple[int, int, str, tuple[int, ...]]]]:
        """Per flat group, (start, end, name, full shape) of each parameter's partition within this rank's flat
        partition: in a ZeRO-3 sub-group each takes `partition_numel()` elements, in the order of
        `optimizer.fp16_groups` (DeepSpeed stage3 `_create_fp16_partitions_with_defragmentation`)."""
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        out = []
        for group in self.engine.optimizer.fp16_groups:
            ranges, pos = [], 0
            for p in group:
                n = p.partition_numel()
                ranges.append((pos, pos + n, names[id(p)], tuple(p.ds_shape)))
                pos += n
            out.append(ranges)
        return out

    def _kept(self, params: str) -> list[list[tuple[int, int]]]:
        """Per flat group, the element ranges of this rank's partitions that a jump leaves alone."""
        if params == "all":
            return [[] for _ in self._flats()[0]]
        return [[(a, b) for a, b, name, _ in group if not extrapolated(name, params)] for group in self._param_ranges()]

    def _rank1(self, params: str = "all") -> dict[tuple[int, int], tuple[torch.Tensor, float, torch.Tensor, int, int, int]]:
        """`subspace: rank1`: per matrix (flat group i, its start in this rank's partition) the leading
        singular triple (u1, s1, v1) of Delta = W - anchor (`core.extrapolation.leading_triple`), and
        where this rank's elements sit in it: (u1, s1, v1, first flat index, count, columns). Rank r
        holds flat elements [r n, r n + n) of each parameter (n = `partition_numel`, the last padded);
        D v and D^T u are summed over those, slice by slice, and all-reduced: no gather. Cached until
        the weights or the anchor move. Matrices `params` leaves out keep W: they are skipped."""
        import zlib

        if self._rank1_cache is not None and self._rank1_cache[0] == (self._moves, params):
            return self._rank1_cache[1]
        masters, _ = self._flats()
        out = {}
        for i, group in enumerate(self._param_ranges()):
            for a, b, name, shape in group:
                if len(shape) != 2 or not extrapolated(name, params):
                    continue
                rows, cols = shape
                first = self.rank * (b - a)
                count = max(0, min(b - a, rows * cols - first))
                dev = masters[i].device

                def product(block: torch.Tensor, transpose: bool, i=i, a=a, first=first, count=count, rows=rows,
                            cols=cols, dev=dev) -> torch.Tensor:
                    """D @ block (or D^T @ block) from this rank's elements of D, all-reduced."""
                    block = block.to(dev)
                    acc = torch.zeros(cols if transpose else rows, block.shape[1], dtype=torch.float64, device=dev)
                    for lo, hi in _slices(count, RANK1_SLICE):
                        e = torch.arange(first + lo, first + hi, device=dev)
                        r, c = e // cols, e % cols
                        d = (masters[i].data[a + lo:a + hi].double() - self.anchor[i][a + lo:a + hi].double())[:, None]
                        acc.index_add_(0, c, d * block[r]) if transpose else acc.index_add_(0, r, d * block[c])
                    return self._all_reduce(acc, "sum")

                u, sigma, v = leading_triple(lambda x: product(x, False), lambda y: product(y, True), rows, cols,
                                             seed=zlib.crc32(name.encode()))
                out[(i, a)] = (u.to(dev), sigma, v.to(dev), first, count, cols)
        self._rank1_cache = ((self._moves, params), out)
        return out

    def direction_stats(self) -> dict[str, float]:
        """At a search: Delta_n = W - anchor on this rank's fp32 master partitions against Delta_{n-1}
        (kept from the last search, in the working dtype), per parameter group, slice by slice: <Delta_{n-1}, Delta_n>,
        ||Delta_{n-1}||^2, ||Delta_n||^2 summed here and all-reduced across ranks (no gather); then
        Delta_{n-1} <- Delta_n in place. `core.extrapolation.direction_metrics` turns the sums into
        cosines and norm ratios."""
        masters, working = self._flats()
        first = self.direction is None
        if first:
            self.direction = [torch.zeros_like(w) for w in working]
        sums = torch.zeros(len(DIRECTION_GROUPS), 3, dtype=torch.float64)
        for i, group in enumerate(self._param_ranges()):
            for a, b, name, _ in group:
                g = DIRECTION_GROUPS.index(direction_group(name))
                for lo, hi in _slices(b - a):
                    new = (masters[i].data[a + lo:a + hi].float() - self.anchor[i][a + lo:a + hi]).double()
                    prev = self.direction[i][a + lo:a + hi]
                    old = prev.double()
                    sums[g] += torch.stack([old @ new, old @ old, new @ new]).cpu()
                    prev.copy_(new)  # rounded to the working dtype
        sums = self._all_reduce(sums, "sum").cpu()
        return direction_metrics({g: tuple(sums[k].tolist()) for k, g in enumerate(DIRECTION_GROUPS)}, first)

    def set_anchor(self) -> None:
        """anchor <- current fp32 master partitions (the accepted point W_acc)."""
        masters, _ = self._flats()
        self.anchor = [m.detach().clone() for m in masters]
        self._moves += 1

    def extrapolate(self, coef: float, params: str = "all") -> None:
        """W <- W + coef * (W - anchor) on the fp32 master partitions, then working <- master (cast to
        the working dtype), no gather. `publish_weights("candidate", coef)` computes the same
        expression on the same masters, slice for slice, so in every dtype the point an evaluator
        scored is bit for bit the point every rank (and then every engine) holds after the jump."""
        masters, working = self._flats()
        self._release_gathered()
        values = self._candidate(coef, params)
        for i, (m, w) in enumerate(zip(masters, working)):
            for lo, hi in _slices(m.numel()):
                m.data[lo:hi].copy_(values(i, lo, hi))
            w.data.copy_(m.data)
        self._moves += 1

    def zero_layout(self) -> dict[str, int]:
        """How ZeRO-3 holds this rank's parameters: `persistent` (kept gathered, DeepSpeed's persistence
        threshold) and `partitioned` tensors (diagnostics)."""
        persistent = len(self.engine.optimizer.persistent_parameters)
        return {"persistent": persistent, "partitioned": sum(1 for _ in self.engine.module.parameters()) - persistent}

    def full_masters(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 master weights on rank 0 (None elsewhere); every rank must call (one gather
        per tensor: for tests and diagnostics, not the hot path)."""
        from deepspeed.utils import safe_get_full_fp32_param

        self._release_gathered()
        full = {name: safe_get_full_fp32_param(p).cpu() for name, p in self.engine.module.named_parameters()}
        return full if self.rank == 0 else None

    def partition_state(self) -> dict[str, list[torch.Tensor]]:
        """This rank's master, working and anchor partitions (for tests and diagnostics)."""
        masters, working = self._flats()
        return {"master": [m.clone() for m in masters], "working": [w.clone() for w in working],
                "anchor": [a.clone() for a in self.anchor] if self.anchor is not None else []}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, per-rank) + this rank's anchor and RNG."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
        extra = {"anchor": self.anchor, "direction": self.direction, "rng": rng_state()}
        torch.save(extra, Path(ckpt_dir) / tag / f"foresight_rank{self.rank}.pt")

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        self.engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        extra = torch.load(Path(ckpt_dir) / tag / f"foresight_rank{self.rank}.pt", weights_only=False)
        self.anchor, self.direction = extra["anchor"], extra.get("direction")
        self._moves += 1
        set_rng_state(extra["rng"])

    def shutdown(self) -> None:
        import torch.distributed as dist

        for sender in self.senders.values():
            sender.close()
        self.senders = {}
        if dist.is_initialized():
            dist.destroy_process_group()


SLICE = 1 << 24
"""Elements per slice when a partition is edited in place (a 64 MB fp32 temporary, not a partition-sized one)."""


RANK1_SLICE = 1 << 20
"""Elements per slice in `_rank1`'s block products (each element gathers a row of the block: 8 float64)."""


def _slices(n: int, size: int = 0) -> list[tuple[int, int]]:
    size = size or SLICE
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _skip_muon_import() -> None:
    """DeepSpeed 0.19 imports its Muon optimizer module in every ZeRO-3 setup only to compare
    classes, and that import compiles kernels (~1 s per rank, most of a tiny run's learner start).
    Foresight never uses Muon: register a stand-in module whose class no optimizer is an instance of."""
    import sys
    import types

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {"__doc__": "never used by Foresight"})
        sys.modules[name] = stub


@contextmanager
def _without_mlflow() -> Iterator[None]:
    """DeepSpeed's autotuner imports mlflow when it is installed (~1.3 s of every rank's start, on
    the critical path of a trial's setup) to log autotuning experiments, which Foresight never runs:
    hide mlflow while DeepSpeed is imported (the learner logs nothing itself; the driver does)."""
    import sys

    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed sets has_mlflow = False
    try:
        yield
    finally:
        del sys.modules["mlflow"]


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
