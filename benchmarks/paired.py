"""Activity calls of several trees side by side.

``python benchmarks/paired.py REV ... [--rounds N]``.

This box's speed drifts by up to 1.5x within an hour, so a figure measured
before a change and one measured after it do not compare; the same benchmark
run on both trees, alternating, does. Each revision (a commit, or ``.`` for the
working tree) is checked out in a temporary git worktree; every round runs
``bench_contended_calls`` and ``bench_activity_calls`` of *this* checkout once
per tree, each in a fresh interpreter importing that tree's package. Prints the
medians over the rounds: ratios to the floor measured in the same run, and ns
per single-thread call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_PROBE = f"""
import json, sys
sys.path.insert(0, {str(HERE)!r})
import run
contended = run.bench_contended_calls(runs=3)
single = run.bench_activity_calls(runs=3)
print(json.dumps({{
    "contended": {{k: v / contended["floor_ns"] for k, v in contended["ns_per_call"].items()}},
    "single": {{k: v / single["floor_ns"] for k, v in single["ns_per_call"].items()}},
    "single_ns": single["ns_per_call"],
}}))
"""


def _measure(tree: Path) -> dict[str, dict[str, float]]:
    """One run of the probe in a fresh interpreter that imports ``tree``'s package."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=tree,  # ``-c`` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, dict[str, float]] = json.loads(out.splitlines()[-1])
    return figures


def paired(revisions: list[str], rounds: int) -> dict[str, Any]:
    """Medians per revision of each figure over ``rounds`` alternations."""
    with tempfile.TemporaryDirectory(prefix="paired-") as tmp:
        trees: dict[str, Path] = {}
        for index, revision in enumerate(revisions):
            if revision == ".":
                trees[revision] = ROOT
                continue
            tree = Path(tmp, str(index))
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), revision],
                check=True,
            )
            trees[revision] = tree
        try:
            runs: dict[str, list[dict[str, dict[str, float]]]] = {rev: [] for rev in trees}
            for _ in range(rounds):
                for revision, tree in trees.items():
                    runs[revision].append(_measure(tree))
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                        check=True,
                    )
    return {
        revision: {
            part: {
                name: round(statistics.median(run[part][name] for run in measured), 2)
                for name in measured[0][part]
            }
            for part in ("contended", "single", "single_ns")
        }
        for revision, measured in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("revisions", nargs="+", help="commits to compare ('.': this tree)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(paired(args.revisions, args.rounds), indent=2))


if __name__ == "__main__":
    main()
