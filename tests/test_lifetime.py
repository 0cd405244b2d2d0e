"""`lab run` as a new user runs it (a plain shell: no Makefile environment, no Prefect server), on
a softcapping model (Gemma 2) with default settings: killed with SIGKILL mid-training it leaves
no process behind, and run again it completes, with its family's substitutions in its log and
no traceback."""

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO
from tests.waiting import poll

pytestmark = pytest.mark.slow
PR_SET_CHILD_SUBREAPER = 36
ONE_PHASE = [
    {
        "name": "phase00",
        "data": ["embedded://curriculum/phase00/train.jsonl"],
        "objective": {"lab_instruction/rule_acc": 1.0},
    }
]


@contextlib.contextmanager
def subreaper():
    """This process adopts orphaned descendants (instead of init), so none can escape the count."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)


def living_descendants(before: set[int]) -> list[psutil.Process]:
    """Descendants of this process started since `before` was taken, zombies reaped."""
    living = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in before:
            continue
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)  # an adopted orphan that has exited
            else:
                living.append(proc)
    return living


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, zoo):
    """`lab run` of one smoke phase on the tiny Gemma 2: SIGKILLed once its first checkpoint is
    being evaluated beside training, then run again with the same run id."""
    root = tmp_path_factory.mktemp("lifetime")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.cli", "run", "demo", "--smoke", "--storage-root", str(root / "runs")]
    command += ["--run-id", "gemma2", "--set", f"model.name_or_path={zoo['gemma2']}"]
    command += ["--set", f"phases={json.dumps(ONE_PHASE)}", "--set", "evaluation.limit=8"]
    phase = root / "runs" / "gemma2" / "phase00"
    with subreaper():
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with open(root / "killed.log", "w") as log:
            lab = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            checkpoint = poll(lambda: next(phase.glob("checkpoints/*/meta.json"), None), timeout_s=400)
            at_kill = [" ".join(p.cmdline()) for p in living_descendants(before) if p.pid != lab.pid]
            lab.send_signal(signal.SIGKILL)
            lab.wait()
        started = time.monotonic()
        gone = poll(lambda: not living_descendants(before), timeout_s=10)
        gone_after_s = time.monotonic() - started
        remaining = [] if gone else [" ".join(p.cmdline()) for p in living_descendants(before)]
        with open(root / "rerun.log", "w") as log:
            rerun = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=500)
        ended = poll(lambda: not living_descendants(before), timeout_s=10)
        after_rerun = [] if ended else [" ".join(p.cmdline()) for p in living_descendants(before)]
    return {
        "checkpoint": checkpoint,
        "at_kill": at_kill,
        "remaining": remaining,
        "gone_after_s": gone_after_s,
        "rerun": rerun.returncode,
        "after_rerun": after_rerun,
        "rerun_log": (root / "rerun.log").read_text(),
        "run": root / "runs" / "gemma2",
    }


def test_a_killed_lab_run_leaves_no_process_behind(killed_then_rerun):
    result = killed_then_rerun
    assert result["checkpoint"] is not None, "training never reached its first checkpoint"
    # Killed while its temporary Prefect server, its trainer and its evaluation worker ran ...
    assert any("uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd for cmd in result["at_kill"])
    assert any("training.train" in cmd for cmd in result["at_kill"])
    assert any("evaluation.worker" in cmd for cmd in result["at_kill"])
    # ... none of them outlived it by 10 s.
    assert result["remaining"] == [], result["remaining"]
    print(f"descendants gone {result['gone_after_s']:.1f} s after the kill (varies with the machine's load)")


def test_run_again_it_completes_and_ends_everything_it_started(killed_then_rerun):
    result = killed_then_rerun
    assert result["rerun"] == 0, result["rerun_log"][-3000:]
    manifest = json.loads((result["run"] / "manifest.json").read_text())
    assert list(manifest["phases"]) == ["phase00"]
    assert result["after_rerun"] == []


def test_a_softcapping_model_trains_with_default_settings_saying_what_it_changed(killed_then_rerun):
    """Gemma 2 on CPU: sdpa cannot cap attention scores, so eager, padded; the chunked loss caps
    the final logits. One log line each, and no traceback (the Makefile's environment unset)."""
    result = killed_then_rerun
    log = result["rerun_log"]
    assert "model.attn_implementation: sdpa -> eager on cpu: gemma2 caps attention scores" in log
    assert "with gemma2's final-logit softcapping (30) applied inside the chunked loss" in log
    assert "Traceback" not in log
    recipe = json.loads((result["run"] / "phase00" / "job.json").read_text())["recipe"]
    assert recipe["model"]["attn_implementation"] == "sdpa" and recipe["training"]["packing"]  # the defaults
    assert recipe["training"]["loss_chunk_tokens"] == 4096
    metrics = [json.loads(line) for line in (result["run"] / "phase00" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # trained, loss finite (not NaN)
    assert metrics[-1]["padding_efficiency"] < 1.0  # padded micro-batches: eager
