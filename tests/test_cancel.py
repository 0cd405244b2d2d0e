"""Cancelling a deployed flow run from Prefect kills its `accelerate launch` process group
(which runs in a session of its own, out of reach of the worker's kill), checked by PID."""

from __future__ import annotations

import pytest

from flows import serve
from tests.stack import alive, prefect_server, processes_mentioning, run_deployment, wait_for_state
from tests.waiting import poll

pytestmark = pytest.mark.slow


def test_cancelling_a_flow_run_leaves_no_training_process(tmp_path, assets):
    runs = tmp_path / "runs"
    with prefect_server(tmp_path) as env, open(tmp_path / "worker.log", "w") as log:
        serve.deploy_all(env)
        worker = serve.start_worker(env, log)
        try:
            # the demo recipe unshrunk: minutes of training, cancelled seconds after it starts
            flow_run_id = run_deployment("finetune/phased-lab", {"recipe": "demo", "storage_root": str(runs)}, env)

            def launcher_and_rank():
                """The run's processes once the launcher has started its rank (`training.train`)."""
                found = processes_mentioning(f"{runs}/")
                return found if any("training.train" in " ".join(p.info["cmdline"]) for p in found) else None

            training = poll(launcher_and_rank, timeout_s=240)
            assert training, (tmp_path / "worker.log").read_text()[-3000:]
            pids = [p.pid for p in training]
            launcher = next(p for p in training if "accelerate.commands.launch" in " ".join(p.info["cmdline"]))
            flow_process = launcher.ppid()  # the flow run's process, which started the launch

            serve.prefect(["flow-run", "cancel", flow_run_id], env)
            # Who goes first: the training group must be killed by the flow process, before it
            # exits. (After it exits, rank 0 would also die at its next print, on the broken
            # pipe; other ranks, silent in a collective, would hang: the test must not pass so.)
            flow_exited_while_training_lived = False

            def training_gone() -> bool:
                nonlocal flow_exited_while_training_lived
                flow_exited_while_training_lived |= not alive([flow_process])
                return not alive(pids)

            poll(training_gone, timeout_s=120, interval_s=0.05)
            assert not alive(pids), f"training processes outlived the cancel: {alive(pids)}"
            assert not flow_exited_while_training_lived, "the training died only after the flow process was gone"
            run = wait_for_state(flow_run_id, env, {"CANCELLED", "CRASHED", "FAILED", "COMPLETED"}, timeout_s=120)
            assert run.state.is_cancelled(), run.state
        finally:
            serve.stop(worker)
