"""What the loop logs about a step besides the loss: the learner's sums turned into means, each
role's busy time and utilization, the critical path, the batch's staleness, and the count of
skipped (non-finite) steps. Pure functions of what the actors report."""

from __future__ import annotations

from typing import Any


class NonFiniteSteps(RuntimeError):
    """Too many consecutive non-finite steps: the run stops with its last good checkpoint."""

    @classmethod
    def at(cls, step: int, in_a_row: int, limit: int, tag: str | None) -> "NonFiniteSteps":
        return cls(f"steps {step - in_a_row + 1}..{step} had a non-finite loss or gradient and were skipped "
                   f"(learner.max_skipped_steps={limit}); the run stops. "
                   + (f"Its last checkpoint ({tag}) is intact: fix the cause and rerun the same command to resume."
                      if tag else "No checkpoint was written yet."))


def train_metrics(stats: list[dict[str, float]]) -> dict[str, float]:
    """`train/*` and `learner/*` from the ranks' sums: per-token means over the step's response
    tokens (`tokens`), the reward per sequence, rank 0's global gradient norm and skip flag."""
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    n = max(total["tokens"], 1.0)
    cross = {"train/cross_chunks_per_token": total["cross_chunks_sum"] / n,
             "train/cross_split_rows": total["cross_split_sum"] / max(total["sequences"], 1.0)} \
        if "cross_chunks_sum" in total else {}
    return {**cross,
        "train/loss": total["loss_sum"] / n,
        "train/reverse_kl": total["reverse_kl_sum"] / n,
        "train/is_ratio": total["is_ratio_sum"] / n,
        "train/is_clipped_frac": total["is_clipped_sum"] / n,
        "train/rollout_logp_abs_diff": total["logp_diff_sum"] / n,
        "train/grad_norm": stats[0]["grad_norm"],
        "train/reward": total["reward_sum"] / max(total["sequences"], 1.0),
        "train/response_tokens": n,
        "train/step_skipped": stats[0]["skipped"],
        "learner/padded_tokens": total["padded_tokens"],
        "learner/real_tokens": total["real_tokens"],
        "learner/padding_share": 1.0 - total["real_tokens"] / max(total["padded_tokens"], 1.0),
    }


def utilization(rmeta: list[dict[str, float]], tmeta: list[dict[str, float]], stats: list[dict[str, float]],
                times: dict[str, float], rollout_actors: int, scorers: int, pipelined: bool) -> dict[str, float]:
    """Busy seconds of each role on this step's batch (`timing/<role>_busy`: the busiest actor), its
    utilization (`util/<role>`: summed busy time / (actors x step wall time)), and the critical path:
    rollout + teacher of the slowest shard, then learner and sync; pipelined, the producer half
    overlaps the learner (the max of the two). Shard i was scored by teacher i mod `scorers`."""
    teacher_busy = [sum(m["busy_s"] for i, m in enumerate(tmeta) if i % scorers == j) for j in range(scorers)]
    learner_busy = [s["busy_s"] for s in stats]
    producer = max(r["busy_s"] + teacher_busy[i % scorers] for i, r in enumerate(rmeta))
    consumer = max(learner_busy) + times["timing/sync"]
    wall = max(times["timing/step"], 1e-9)
    return {"timing/rollout_busy": max(r["busy_s"] for r in rmeta), "timing/teacher_busy": max(teacher_busy),
            "timing/learner_busy": max(learner_busy),
            "timing/critical_path": max(producer, consumer) if pipelined else producer + consumer,
            "util/rollout": sum(r["busy_s"] for r in rmeta) / (rollout_actors * wall),
            "util/teacher": sum(teacher_busy) / (scorers * wall),
            "util/learner": sum(learner_busy) / (len(learner_busy) * wall)}


def staleness(step: int, rmeta: list[dict[str, float]], version_step: dict[int, int]) -> int:
    """How many learner steps older than on-policy (W_{t-1}) the oldest sample of step `step` is,
    from the weights version each rollout worker reports having sampled with."""
    try:
        return max((step - 1) - version_step[int(m["version"])] for m in rmeta)
    except KeyError as err:
        raise RuntimeError(f"step {step}: a rollout worker sampled with weights version {err.args[0]}, "
                           "which the learner never published") from None


def count_skip(state: Any, metrics: dict[str, float]) -> bool:
    """Count a non-finite (skipped) step in the run state (`train/skipped_steps` in `metrics`);
    True when it was skipped."""
    skipped = metrics["train/step_skipped"] > 0
    state.skipped_steps += int(skipped)
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    metrics["train/skipped_steps"] = float(state.skipped_steps)
    return skipped
