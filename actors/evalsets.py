"""Named evaluation sets (`eval.sets`) scored by the rollout workers, HF and vLLM alike.

Per set: greedy accuracy, and k samples per prompt at temperature T giving

    mean@k = (1/N) sum_i (1/k) sum_j r_ij      (avg@k in the papers)
    pass@k = (1/N) sum_i max_j r_ij

with r_ij in {0, 1} the task reward of prompt i's j-th sample. A worker returns sums over its share
of the prompts; the driver divides by the total count. Samples are seeded by (run seed, set, step,
first prompt index), so a repeated evaluation draws the same tokens.
"""

from __future__ import annotations

import zlib
from typing import Any

from actors.weights import WeightsHandle
from core.task import eval_sets_of


def eval_seed(run_seed: int, name: str, step: int, first: int) -> int:
    return (run_seed * 1_000_003 + zlib.crc32(name.encode()) % 100_003 * 7_919 + step) * 131 + first


class ScoresEvalSets:
    """Mixin for rollout workers: `eval_set(...)`; the worker supplies `complete(prompts, T, seed)`
    (T = 0: greedy) returning decoded completions, plus `sync`, `cfg` and `task`."""

    _eval_sets: dict | None = None

    def complete(self, prompts: list[str], temperature: float, seed: int | None) -> list[str]:
        raise NotImplementedError

    def eval_set(self, name: str, indices: list[int], handle: WeightsHandle | None, step: int) -> dict[str, float]:
        """Sums over prompts `indices` of set `name`: `count`, `accuracy` (greedy), `mean_at_<k>`, `pass_at_<k>`."""
        self.sync(handle)
        if self._eval_sets is None:
            self._eval_sets = eval_sets_of(self.cfg)
        spec, data = self.cfg["eval_sets"][name], self._eval_sets[name]
        examples = [data[i] for i in indices]
        rewards = self.task.rewards
        out: dict[str, float] = {"count": float(len(examples))}
        if not examples:
            return out
        if spec["greedy"]:
            texts = self.complete([e.prompt for e in examples], 0.0, None)
            out["accuracy"] = float(sum(rewards(texts, [e.answer for e in examples])))
        if spec["k"]:
            k = spec["k"]
            texts = self.complete([e.prompt for e in examples for _ in range(k)], spec["temperature"],
                                  eval_seed(self.cfg["seed"], name, step, indices[0]))
            correct = rewards(texts, [examples[i // k].answer for i in range(len(texts))])
            per_prompt = [correct[i * k:(i + 1) * k] for i in range(len(examples))]
            out[f"mean_at_{k}"] = float(sum(sum(c) / k for c in per_prompt))
            out[f"pass_at_{k}"] = float(sum(max(c) for c in per_prompt))
        return out


def mean_over(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per-worker sums -> means over every prompt of the set."""
    count = sum(r["count"] for r in results)
    keys = {k for r in results for k in r if k != "count"}
    return {k: sum(r.get(k, 0.0) for r in results) / count for k in sorted(keys)} if count else {}
