"""Throughput of the sandboxed code rewards: a batch of 64 APPS-style completions (stdin/stdout and
call-based cases, 6 cases each; right, wrong and crashing programs) checked by `code_io` under each
isolation this machine offers, one at a time and in parallel.

    python benchmarks/code_rewards.py [--repeats 3]

Writes benchmarks/results/code_rewards.json (rewards/s per isolation and parallelism, the batch's
sha256) and logs it to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from core.code_rewards import CodeReward  # noqa: E402
from core.config import SandboxConfig  # noqa: E402
from core.sandbox import interpreter, probe  # noqa: E402
from step_overhead import log_benchmark  # noqa: E402

CASES = 6
PROBLEMS = {
    # name: (program, wrong program, inputs -> output, fn_name)
    "sum": ("n = int(input())\nprint(sum(map(int, input().split())))\n",
            "n = int(input())\nprint(max(map(int, input().split())))\n",
            lambda i: (f"{i + 3}\n" + " ".join(str(j * i - 7) for j in range(i + 3)) + "\n",
                       str(sum(j * i - 7 for j in range(i + 3)))), None),
    "sort": ("input()\nprint(*sorted(map(int, input().split())))\n",
             "input()\nprint(*map(int, input().split()))\n",
             lambda i: (f"5\n{' '.join(str((i * 7 + k * 3) % 11) for k in range(5))}\n",
                        " ".join(map(str, sorted((i * 7 + k * 3) % 11 for k in range(5))))), None),
    "fib": ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
            "def fib(n):\n    return n\n",
            lambda i: ([i + 5], [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144][i + 5]), "fib"),
    "primes": ("class Solution:\n    def count(self, n):\n        return sum(all(k % d for d in range(2, k)) for k in range(2, n))\n",
               "class Solution:\n    def count(self, n):\n        return n // 2\n",
               lambda i: ([10 * (i + 1)], sum(all(k % d for d in range(2, k)) for k in range(2, 10 * (i + 1)))), "count"),
}


def batch(n: int = 64) -> tuple[list[str], list[str], list[float]]:
    """n (completion, cases, expected reward): per problem in turn, right / wrong / crashing / right."""
    completions, answers, expected = [], [], []
    names = list(PROBLEMS)
    for i in range(n):
        right, wrong, case, fn = PROBLEMS[names[i % len(names)]]
        pairs = [case(k) for k in range(CASES)]
        answers.append(json.dumps({"inputs": [p[0] for p in pairs], "outputs": [p[1] for p in pairs],
                                   **({"fn_name": fn} if fn else {})}))
        kind = (i // len(names)) % 4
        program = {0: right, 1: wrong, 2: "raise RuntimeError('no')\n", 3: right}[kind]
        completions.append(f"Here is my solution.\n```python\n{program}```")
        expected.append(float(kind in (0, 3)))
    return completions, answers, expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "code_rewards.json"))
    args = parser.parse_args()
    completions, answers, expected = batch()
    cpus = len(os.sched_getaffinity(0))
    rows = []
    for isolation in ("bwrap", "uid", "none"):
        why = probe(isolation)
        if why:
            print(f"{isolation}: not available here ({why})")
            continue
        for parallel in sorted({1, cpus, 2 * cpus}):
            reward = CodeReward("code_io", SandboxConfig(isolation=isolation, parallel=parallel))
            got = reward.many(completions, answers)  # warm-up, and the check that scores are right
            assert got == expected, f"{isolation}: scores {got} != {expected}"
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                reward.many(completions, answers)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            rows.append({"isolation": isolation, "parallel": parallel, "seconds": t, "rewards_per_s": len(completions) / t})
            print(f"{isolation:>5} parallel {parallel}: {len(completions) / t:6.1f} rewards/s ({t * 1e3:.0f} ms per 64)", flush=True)
    result = {
        "benchmark": "code_rewards",
        "batch": {"completions": len(completions), "cases_each": CASES, "right": int(sum(expected)),
                  "sha256": hashlib.sha256(json.dumps([completions, answers]).encode()).hexdigest()},
        "results": rows,
        "best_rewards_per_s": {iso: max(r["rewards_per_s"] for r in rows if r["isolation"] == iso)
                               for iso in {r["isolation"] for r in rows}},
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "harness_python": interpreter(), "root": os.geteuid() == 0},
        "settings": {"repeats": args.repeats, "limits": SandboxConfig().model_dump()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log_benchmark(result, "code_rewards")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
