"""``make bench``: run every benchmark in one process tree, print a table, write bench/results.json.

``--quick`` runs fewer iterations (CI); ``--check`` fails if a ratio to its floor regresses past the
generous limits in bench/thresholds.json in two runs in a row: a shared machine can be slow for a minute,
a regression stays.
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


def over_limits(data: dict, limits: dict[str, float | dict[str, float]]) -> dict[str, str]:
    """The guarded figures whose ratio passes its limit, each with a line that shows both numbers it divided. A
    limit is on the figure's p50 over its floor's, or, written ``{"p90": limit}``, on its p90 over the floor's
    p50: for a regression that shows as a tail (a time slice lost now and then), not as a slower median."""
    bad = {}
    for name, limit in limits.items():
        row = data[name]
        stat, limit = next(iter(limit.items())) if isinstance(limit, dict) else ("p50", limit)
        floor = data[row["floor"]]
        ratio = row[stat] / floor["p50"]
        if ratio > limit:
            bad[name] = (f"{name}: {stat} {row[stat]:.1f} {row['unit']} is {ratio:.1f}x {row['floor']} "
                         f"({floor['p50']:.1f} {floor['unit']}), limit {limit}x")  # fmt: skip
    return bad


def measure(quick: bool) -> dict:
    text, data = render(suites.run_all(quick=quick))
    print(text)
    out = HERE / ("results-quick.json" if quick else "results.json")
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    parser.add_argument("--check", action="store_true",
                        help="fail on ratio regressions (bench/thresholds.json) seen in two runs in a row")  # fmt: skip
    args = parser.parse_args()
    data = measure(args.quick)
    if not args.check:
        return 0
    limits = json.loads((HERE / "thresholds.json").read_text())
    bad = over_limits(data, limits)
    if bad:
        for line in bad.values():
            print(f"over the limit: {line}", file=sys.stderr)
        print("measuring again: a regression must show in two runs in a row", file=sys.stderr)
        again = over_limits(measure(args.quick), {name: limits[name] for name in bad})
        for line in again.values():
            print(f"REGRESSION {line}", file=sys.stderr)
        return 1 if again else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
