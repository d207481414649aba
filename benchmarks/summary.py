"""Print the committed EffOPD speed-up measurement beside a fresh demo (`make demo` calls it).

    python benchmarks/summary.py [--lr 1e-05]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "effopd_speedup.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", default="1e-05")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text())
    per = data["per_lr"].get(args.lr)
    if per is None:
        print(f"no committed measurement at lr {args.lr} ({RESULTS})")
        return 0
    seeds = len(data["settings"]["seeds"])
    print(f"committed benchmark ({RESULTS.name}, {seeds} seeds, lr {args.lr}, horizon {per['horizon_steps']} steps): "
          "step speed-up vs vanilla, median [min, max] over seeds")
    for method, cell in per["table"].items():
        if method == "vanilla":
            continue
        parts = []
        for f, sp in cell["step"].items():
            parts.append(f"{int(float(f) * 100)}%: " + ("-" if sp["median"] is None else
                                                      f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]"))
        acc = cell["final_acc"]["median"]
        print(f"  {method:<15} {'   '.join(parts)}   final accuracy {acc:.3f} (vanilla {cell['vanilla_final_acc']['median']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
