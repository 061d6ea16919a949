"""The long kill soak: 500 random SIGKILLs of a real game process against a real PDS.

Starts its own reference PDS (``tests/pds_harness.py``; rate limits off, since
the soak logs in again and again and would hit the 30-per-5-minutes
``createSession`` limit), creates an account, runs :func:`soak.run_soak` (the
harness ``tests/test_kill_soak.py`` runs with 14 kills), and writes the figures
into ``benchmarks/results.json`` under ``kill_soak`` (other keys are kept). The
work dir (data dir, journal, each run's stderr, ``detail.json`` with every
loss and what the store says of it) is kept when anything was lost, duplicated
or crashed, or always with ``--keep DIR``; its path is printed.

    python benchmarks/kill_soak.py [--kills 500] [--seed N] [--keep DIR]

Target (issue 7): 0 early losses (sessions whose ``start_session()`` returned at
least 100 ms before the kill), 0 wrong ends, 0 duplicates.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pds_harness import PdsServer  # tests/ is on the path (above)
from soak import RunInfo, SoakConfig, SoakResult, run_soak

RESULTS = Path(__file__).with_name("results.json")


def soak_benchmark(
    kills: int = 500, seed: int | None = None, keep: Path | None = None
) -> tuple[SoakResult, Path | None]:
    """Run the soak with ``kills`` SIGKILLs against a fresh local PDS.

    Returns the result and the work dir if it was kept (``keep``, or evidence).
    """
    seed = random.SystemRandom().getrandbits(32) if seed is None else seed
    workdir = Path(tempfile.mkdtemp(prefix="kill-soak-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)

    def progress(info: RunInfo, done: int) -> None:
        if info.index % 25 == 0 or info.returncode not in (0, -9):
            print(
                f"run {info.index}: {done}/{kills} kills, rc {info.returncode},"
                f" {info.phase_at_kill or 'ended by itself'}, link {info.link_at_end},"
                f" {info.unsynced_before} unsynced before",
                file=sys.stderr,
            )

    with PdsServer().start(rate_limits=False) as pds:
        account = pds.create_account("soak")
        config = SoakConfig(kills=kills, seed=seed, drain_deadline=300.0)
        result = run_soak(pds, account, workdir, config, progress=progress)
    evidence = bool(result.losses or result.unknown_on_pds or result.crashed_runs)
    if keep is None and not evidence:
        shutil.rmtree(workdir, ignore_errors=True)
        return result, None
    (workdir / "detail.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result, workdir


def main() -> None:
    """Run the soak, merge its figures into results.json, print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep data dir and journal here")
    args = parser.parse_args()
    result, kept = soak_benchmark(args.kills, args.seed, args.keep)
    figures: dict[str, Any] = result.figures()
    figures["target"] = "early_lost == 0, wrong_end == 0, duplicates == 0"
    figures["target_met"] = (
        result.early_lost == 0
        and result.wrong_end == 0
        and result.duplicates == 0
        and not result.crashed_runs
    )
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["kill_soak"] = figures
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    if result.losses or result.unknown_on_pds or result.crashed_runs:
        print(result.summary(limit=20), file=sys.stderr)
    if kept is not None:
        print(f"work dir (journal, data dir, detail.json): {kept}", file=sys.stderr)


if __name__ == "__main__":
    main()
