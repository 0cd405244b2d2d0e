"""`make test` time of commits, each run from a fresh clone, one run after another.

    .venv/bin/python bench/make_test_time.py --runs 3 HEAD --base bec42e1

Each run clones this repository into a new directory beside it (the tests read ../shared, as in
CI's checkout), checks the commit out and runs `CI=true bash .ci/run` (what CI runs: install, lint,
`make test`). It records the run's wall seconds, pytest's summary line and, from a junit XML, every
test's seconds (setup, call and teardown); the clone is then removed. Printed: each commit's spread
over its runs (mean ± sd, min-max), then, when a base is given, the sum of per-test seconds on the
tests that passed in every run of both commits, so that a test added since, renamed or hung (a
pytest-timeout counts its whole limit) stays out of the ratio. The last line is one JSON object.

What varies with the machine: the seconds (run the base in the same call, on the same machine).
What varies from run to run: mostly the two-worker deployment tests (142-216 s for one test on
one 2-core VM). A fresh clone installs from the pip cache when it is warm, CI from the index.
Nothing else of yours should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_make_test(commit: str, workdir: Path, label: str, pytest_args: str) -> dict:
    """One fresh-clone CI run of `commit`; its wall seconds, summary line and per-test outcomes."""
    # Beside this repository, as CI's checkout is: the tests read ../shared (MT-Bench data).
    clone = Path(tempfile.mkdtemp(prefix=f"make_test_time_{label}_", dir=REPO.parent))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    junit = workdir / f"{label}.xml"
    log = workdir / f"{label}.log"
    env = {**os.environ, "CI": "true", "PYTEST_ADDOPTS": f"--junitxml={junit} {pytest_args}"}
    start = time.monotonic()
    with log.open("w") as out:
        returncode = subprocess.run(
            ["bash", ".ci/run"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.monotonic() - start
    shutil.rmtree(clone)  # its .venv alone is ~2.7 GB; the log and the junit file stay
    summary = [line for line in log.read_text().splitlines() if " passed" in line or " failed" in line][-1:]
    tests = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            passed = all(case.find(tag) is None for tag in ("failure", "error", "skipped"))
            tests[f"{case.get('classname')}::{case.get('name')}"] = (float(case.get("time")), passed)
    return {
        "commit": commit,
        "returncode": returncode,
        "seconds": seconds,
        "summary": "".join(summary),
        "tests": tests,
        "log": str(log),
    }


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f} s (one run: no spread)"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f} s ({min(values):.0f}-{max(values):.0f})"


def passed_everywhere(runs: list[dict]) -> set[str]:
    return set.intersection(*({name for name, (_, passed) in run["tests"].items() if passed} for run in runs))


def mean_test_seconds(runs: list[dict], names: set[str]) -> float:
    """The sum over `names` of each test's seconds, averaged over the runs."""
    return statistics.mean(sum(run["tests"][name][0] for name in names) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", help="the commit to time (any git revision of this repository)")
    parser.add_argument("--base", help="a commit to compare with, timed in the same call")
    parser.add_argument("--runs", type=int, default=3, help="fresh-clone runs per commit (a spread needs 2 or more)")
    parser.add_argument(
        "--pytest-args", default="", help="extra pytest arguments, e.g. '-k test_masks' to time a subset"
    )
    parser.add_argument("--workdir", type=Path, help="where logs and junit files go (default: a temporary directory)")
    args = parser.parse_args()
    # Absolute: pytest writes the junit file from inside the clone.
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="make_test_time_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    commits = {"head": args.commit, **({"base": args.base} if args.base else {})}
    # Interleaved (head, base, head, base, ...): a drift of the machine's speed falls on both.
    runs: dict[str, list[dict]] = {side: [] for side in commits}
    order = [(index, side) for index in range(args.runs) for side in commits]
    for count, (index, side) in enumerate(order, start=1):
        label = f"{side}{index + 1}"
        print(f"[{count}/{len(order)}] {label} {commits[side]} ...", flush=True)
        run = run_make_test(commits[side], workdir, label, args.pytest_args)
        runs[side].append(run)
        print(f"    rc={run['returncode']} {run['seconds']:.0f} s  {run['summary']}  ({run['log']})", flush=True)

    result = {}
    for side, side_runs in runs.items():
        seconds = [run["seconds"] for run in side_runs]
        print(
            f"{side} {commits[side]}: make test {spread(seconds)} over {len(seconds)} runs; failed runs: {sum(run['returncode'] != 0 for run in side_runs)}"
        )
        result[f"{side}_seconds"] = seconds
    if args.base:
        common = passed_everywhere(runs["head"] + runs["base"])
        head_s, base_s = mean_test_seconds(runs["head"], common), mean_test_seconds(runs["base"], common)
        print(
            f"{len(common)} tests passed in every run of both: head {head_s:.1f} s, base {base_s:.1f} s, head/base {head_s / base_s:.3f}"
        )
        result |= {
            "common_tests": len(common),
            "common_head_s": head_s,
            "common_base_s": base_s,
            "common_ratio": head_s / base_s,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
