"""Compare two run directories (or two trees of them) array by array: are they bitwise identical?

``python -m eval.compare_runs BEFORE AFTER [--csv OUT]``: for every run directory under BEFORE (a directory
holding ``final.json``) and its counterpart under AFTER (the same relative path), every array of its ``.npz``
files and every metric column the two ``metrics.csv`` share is compared exactly (``numpy.array_equal``, NaN
equal to NaN); the maximum absolute difference is reported where they differ. Timing columns (``seconds``,
``ms_per_iter``, ``total_seconds``) are skipped: wall time is not a result. Exit status 1 if anything differs
or a run is missing. A regression check for refactors (issue 13: both tasks through the one loop).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.io import write_csv

TIMING = ("seconds", "ms_per_iter", "total_seconds")


def _equal(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
        return False, float("inf")
    if a.dtype.kind in "fc":
        same = bool(np.array_equal(a, b, equal_nan=True))
        finite = np.isfinite(a) & np.isfinite(b)
        return same, float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
    return bool(np.array_equal(a, b)), 0.0


def compare_run(before: Path, after: Path) -> list[dict]:
    """One row per compared quantity: ``{run, quantity, identical, max_abs_diff}``."""
    rows = []
    for npz in sorted(before.glob("*.npz")):
        with np.load(npz) as old, np.load(after / npz.name) as new:
            for key in old.files:
                same, diff = _equal(old[key], new[key]) if key in new.files else (False, float("inf"))
                rows.append({"quantity": f"{npz.name}:{key}", "identical": same, "max_abs_diff": diff})
    old_metrics, new_metrics = pd.read_csv(before / "metrics.csv"), pd.read_csv(after / "metrics.csv")
    for column in old_metrics.columns:
        if column in TIMING or column not in new_metrics.columns:
            continue
        same, diff = _equal(old_metrics[column].to_numpy(), new_metrics[column].to_numpy())
        rows.append({"quantity": f"metrics.csv:{column}", "identical": same, "max_abs_diff": diff})
    old_final, new_final = (json.loads((d / "final.json").read_text()) for d in (before, after))
    for key, value in old_final.items():
        if key in TIMING or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        same = key in new_final and (value == new_final[key] or (value != value and new_final[key] != new_final[key]))
        rows.append({"quantity": f"final.json:{key}", "identical": same,
                     "max_abs_diff": abs(value - new_final[key]) if key in new_final else float("inf")})
    return rows


def compare_trees(before: Path, after: Path) -> pd.DataFrame:
    rows = []
    for final in sorted(before.rglob("final.json")):
        run = final.parent.relative_to(before)
        if not (after / run / "final.json").is_file():
            rows.append({"run": str(run), "quantity": "final.json", "identical": False, "max_abs_diff": float("inf")})
            continue
        rows += [{"run": str(run), **row} for row in compare_run(before / run, after / run)]
    return pd.DataFrame(rows, columns=["run", "quantity", "identical", "max_abs_diff"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--csv", type=Path, help="write the comparison table here")
    args = parser.parse_args()
    table = compare_trees(args.before, args.after)
    if args.csv:
        write_csv(args.csv, table)
    per_run = table.groupby("run")["identical"].agg(["all", "size"])
    for run, row in per_run.iterrows():
        print(f"{'identical' if row['all'] else 'DIFFERENT'}  {run}  ({row['size']} quantities)")
    differing = table[~table["identical"]]
    if not differing.empty:
        print(differing.to_string(index=False))
    raise SystemExit(0 if not table.empty and differing.empty else 1)


if __name__ == "__main__":
    main()
