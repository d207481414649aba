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

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.extrapolation import extrapolate
from orchestrator.losses import NEEDS_TEACHER_DISTRIBUTION, LossInputs, grpo_advantages, opd_loss, sparsify
from orchestrator.modeling import concat_batches, load_model, quiet_hf, response_logits, slice_batch


def ds_config(lr: float, betas: tuple[float, float], weight_decay: float, grad_clip: float) -> dict[str, Any]:
    """ZeRO-3 config that partitions even tiny models and compiles no op (torch AdamW)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Learner:
    """One ZeRO-3 rank. Plain Python; `ray.remote(Learner)` is applied in `actors/group.py`."""

    # set in __init__
    rank: int
    world_size: int
    cfg: dict[str, Any]
    # set in setup()
    engine: Any
    anchor: list[torch.Tensor] | None

    def __init__(self, rank: int, world_size: int, master_port: int, cfg: dict[str, Any]) -> None:
        quiet_hf()
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        os.environ.update({
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0" if not torch.cuda.is_available() else str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        })
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(1)
        self.engine, self.anchor = None, None

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> int:
        """Join the process group and build the ZeRO-3 engine from the student checkpoint."""
        import torch._dynamo  # noqa: F401  (DeepSpeed + transformers 5 need it imported first)
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT compile
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(self.cfg["seed"])
        model = load_model(self.cfg["student_path"])
        model.train()
        lc = self.cfg["learner"]
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config(lc["lr"], tuple(lc["betas"]), lc["weight_decay"], lc["grad_clip"]),
        )
        return sum(p.ds_numel for p in self.engine.module.parameters())

    # ------------------------------------------------------------------ training
    def train_step(self, rollout_refs: list, teacher_refs: list, adv_scale: float, step: int = 0) -> dict[str, float]:
        """One optimizer step on this rank's shard of the global batch; returns token-sum stats."""
        import ray

        batch = concat_batches(ray.get(rollout_refs))
        teacher = concat_batches(ray.get(teacher_refs))
        lcfg = self.cfg["loss"]
        rlvr_all, keep_all = self._token_controls(batch, teacher, lcfg, step)
        B = batch["input_ids"].shape[0]
        lo, hi = self.rank * B // self.world_size, (self.rank + 1) * B // self.world_size
        mine, tmine = slice_batch(batch, lo, hi), slice_batch(teacher, lo, hi)
        rlvr, keep = (t[lo:hi] if t is not None else None for t in (rlvr_all, keep_all))
        logits = response_logits(self.engine, mine["input_ids"], mine["attention_mask"], mine["prompt_len"])
        inputs = LossInputs(
            logits_BRV=logits, tokens_BR=mine["response"], mask_BR=mine["response_mask"],
            teacher_logp_BR=tmine["logp"], rollout_logp_BR=mine["logp"],
            teacher_logp_BRV=tmine.get("logp_full") if lcfg["type"] in NEEDS_TEACHER_DISTRIBUTION else None,
            adv_scale=adv_scale, importance_correction=lcfg["importance_correction"],
            importance_threshold=lcfg["importance_threshold"],
            norm=float(batch["response_mask"].sum()) / self.world_size,
            rlvr_adv_BR=rlvr, rlvr_mix=lcfg["rlvr_mix"], keep_BR=keep,
        )
        loss, stats = opd_loss(lcfg["type"], inputs)
        self.engine.backward(loss)
        self.engine.step()
        stats["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        stats["reward_sum"] = float(mine["rewards"].sum())
        stats["sequences"] = float(hi - lo)
        return stats

    def _token_controls(self, batch: dict, teacher: dict, lcfg: dict, step: int):
        """Global-batch GRPO advantages [B, R] and token-sparsification weights [B, R] (or None).

        Computed before sharding so groups and the top-KL selection see the whole batch; the
        per-token KL score uses the rollout log-probs (r_t - q_t).
        """
        mask = batch["response_mask"]
        rlvr = None
        if lcfg["rlvr_mix"] < 1.0:
            adv = grpo_advantages(batch["rewards"], self.cfg["rollout"]["samples_per_prompt"])
            rlvr = adv[:, None] * mask
        keep = None
        if lcfg["token_keep"] < 1.0:
            keep = sparsify(mask, batch["logp"] - teacher["logp"], lcfg["token_keep"], lcfg["token_select"],
                            seed=self.cfg["seed"] * 1_000_003 + step)
        return rlvr, keep

    # ------------------------------------------------------------------ controls
    def set_grad_projection(self, bases_ref: list) -> int:
        """Project every listed weight's gradient onto its basis: g <- g V V^T (V: [in, K]).

        The hook sees each rank's local (pre-reduction) gradient; projection is linear, so the
        averaged gradient is projected too. Returns the number of hooked matrices.
        """
        import ray

        bases = ray.get(bases_ref[0]) if isinstance(bases_ref, list) else bases_ref
        hooked = 0
        for name, p in self.engine.module.named_parameters():
            v = bases.get(name)
            if v is None:
                continue
            v = v.to(torch.float32)
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
        """Gather one bucket at a time (one collective each); rank 0 puts it in the object store."""
        import deepspeed
        import ray

        self._release_gathered()
        refs: list | None = [] if self.rank == 0 else None
        for bucket in self._buckets(bucket_mb):
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                if refs is not None:
                    refs.append(ray.put({name: p.detach().to("cpu", torch.float32, copy=True) for name, p in bucket}))
        return refs

    def publish_weights(self, bucket_mb: float, which: str = "current") -> list | None:
        """Put the full weights (or the EffOPD anchor) in the object store once, in buckets.

        Returns on rank 0 a list of ObjectRefs, each a {name: tensor} dict of about `bucket_mb`
        MB; None on other ranks. Rollout workers and evaluators `ray.get` the buckets; the
        driver passes the same refs to all of them (put once, not per worker).
        """
        if which == "anchor":
            return self._with_working_copy(self.anchor, lambda: self._put_full(bucket_mb))
        return self._put_full(bucket_mb)

    # ------------------------------------------------------------------ GPU: NCCL to vLLM engines
    def nccl_endpoint(self) -> tuple[str, int]:
        """(node IP, free port) for the weight-transfer group's rendezvous, hosted by rank 0."""
        import ray

        from actors.group import free_port

        return ray.util.get_node_ip_address(), free_port()

    def nccl_open(self, address: str, port: int, world_size: int, bucket_bytes: int) -> list | None:
        """Rank 0 joins the weight-transfer group as its sender (blocks until every engine joins);
        returns the update's metadata (name, dtype, full shape), in send order."""
        if self.rank != 0:
            return None
        from actors.vllm_nccl import TrainerSender

        self.sender = TrainerSender(address, port, world_size, bucket_bytes)
        return TrainerSender.meta([item for bucket in self._buckets(self.cfg["learner"]["sync_bucket_mb"])
                                   for item in bucket])

    def nccl_send(self) -> None:
        """Every rank gathers the same buckets (ZeRO-3 collectives); rank 0 broadcasts each
        gathered tensor to the engines (vLLM packs them into `bucket_bytes` buffers)."""
        import deepspeed

        self._release_gathered()

        def gathered():
            for bucket in self._buckets(self.cfg["learner"]["sync_bucket_mb"]):
                with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                    for name, p in bucket:
                        yield name, p.detach().clone()  # the gather buffer is released on exit

        if self.rank == 0:
            self.sender.send(gathered())
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

    def _with_working_copy(self, source: list[torch.Tensor], fn):
        """Run fn() with the working partitions temporarily set to `source`, then restore."""
        masters, working = self._flats()
        self._release_gathered()
        for w, s in zip(working, source):
            w.data.copy_(s)
        try:
            return fn()
        finally:
            self._release_gathered()
            for w, m in zip(working, masters):
                w.data.copy_(m)

    def set_anchor(self) -> None:
        """anchor <- current fp32 master partitions (the accepted point W_acc)."""
        masters, _ = self._flats()
        self.anchor = [m.detach().clone() for m in masters]

    def extrapolate(self, coef: float) -> None:
        """W <- W + coef * (W - anchor) on master and working partitions, no gather."""
        masters, working = self._flats()
        self._release_gathered()
        for m, w, a in zip(masters, working, self.anchor):
            m.data.copy_(extrapolate(m.data, a, coef))
            w.data.copy_(m.data)

    def partition_state(self) -> dict[str, list[torch.Tensor]]:
        """This rank's master, working and anchor partitions (for tests and diagnostics)."""
        masters, working = self._flats()
        return {"master": [m.clone() for m in masters], "working": [w.clone() for w in working],
                "anchor": [a.clone() for a in self.anchor] if self.anchor is not None else []}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, per-rank) + this rank's anchor and RNG."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
        extra = {"anchor": self.anchor, "rng": rng_state()}
        torch.save(extra, Path(ckpt_dir) / tag / f"foresight_rank{self.rank}.pt")

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        self.engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        extra = torch.load(Path(ckpt_dir) / tag / f"foresight_rank{self.rank}.pt", weights_only=False)
        self.anchor = extra["anchor"]
        set_rng_state(extra["rng"])

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
