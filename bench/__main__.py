"""``make bench``: run every benchmark in one process tree, print a table, write bench/results.json.

``--quick`` runs fewer iterations (CI); ``--check`` fails if a ratio to its floor regresses past the
generous limits in bench/thresholds.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import suites
from bench.harness import Figure

HERE = Path(__file__).parent


def render(figures: list[Figure]) -> tuple[str, dict]:
    by_name = {f.name: f for f in figures}
    rows, data = [], {}
    for f in figures:
        floor = by_name.get(f.floor) if f.floor else None
        ratio = f.p50 / floor.p50 if floor else None
        data[f.name] = {"unit": f.unit, "p50": f.p50, "p90": f.pct(90), "p99": f.pct(99), "n": len(f.samples_us),
                        "floor": f.floor, "ratio": ratio, "note": f.note, **f.extra}  # fmt: skip
        ratio_text = f"{ratio:7.1f}x" if ratio else "      -"
        rows.append(f"{f.name:66} {f.p50:10.1f} {f.pct(90):10.1f} {f.pct(99):10.1f} {f.unit:5} {ratio_text}  {f.note}")
    header = f"{'figure':66} {'p50':>10} {'p90':>10} {'p99':>10} {'unit':5} {'÷floor':>8}"
    return "\n".join([header, "-" * len(header), *rows]), data


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    parser.add_argument("--check", action="store_true", help="fail on ratio regressions (bench/thresholds.json)")
    args = parser.parse_args()
    figures = suites.run_all(quick=args.quick)
    text, data = render(figures)
    print(text)
    out = HERE / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {out}")
    if args.check:
        limits = json.loads((HERE / "thresholds.json").read_text())
        ratios = {name: data[name]["ratio"] for name in limits if name in data and data[name]["ratio"]}
        bad = [f"{name}: {ratio:.1f}x its floor, limit {limits[name]}x"
               for name, ratio in ratios.items() if ratio > limits[name]]
        for line in bad:
            print(f"REGRESSION {line}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
