"""The finetune flow end to end on the tiny model, under a temporary Prefect API."""

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def flow_logs(flow_run_id) -> str:
    """Everything the flow run logged, as stored by the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler.flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_phased_smoke_run_writes_every_file_of_the_data_contract(tmp_path, prefect_server, assets):
    from flows.finetune import finetune

    result = finetune(recipe="demo", storage_root=str(tmp_path), smoke=True, run_id="e2e")
    run = tmp_path / "e2e"
    assert result["run_uri"] == str(run)

    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["phases"]) == ["phase00", "phase05", "phase10"]
    assert manifest["recipe"]["training"]["effective_batch_size"] == 32

    previous_winner = None
    for phase in ("phase00", "phase05", "phase10"):
        stats = json.loads((run / "data" / phase / "stats.json").read_text())
        assert stats["samples"] > 0
        assert (run / "data" / phase / "tokens.parquet").exists()
        metrics = [json.loads(x) for x in (run / phase / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(m["step"] == i + 1 for i, m in enumerate(metrics))
        checkpoints = sorted((run / phase / "checkpoints").iterdir())
        assert checkpoints and all((c / "meta.json").exists() for c in checkpoints)
        for c in checkpoints:
            meta = json.loads((c / "meta.json").read_text())
            assert meta["phase"] == phase
            if previous_winner:
                assert meta["parent_checkpoint"] == previous_winner  # the gate's winner started this phase
            evaluation = json.loads((run / phase / "eval" / c.name / "lm_eval.json").read_text())
            assert set(evaluation["metrics"]) >= {"lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"}
        selection = json.loads((run / phase / "selection.json").read_text())
        assert selection["gate"]["passed"] is True
        assert selection["winner"]["checkpoint"] in {str(c) for c in checkpoints}
        best = max(c["objective"] for c in selection["candidates"])
        assert selection["winner"]["objective"] == best
        previous_winner = selection["winner"]["checkpoint"]

    summary = pd.read_csv(run / "report" / "summary.csv")
    assert list(summary["phase"]) == ["phase00", "phase05", "phase10"]
    for png in ("training.png", "scores.png"):
        assert (run / "report" / png).read_bytes()[:4] == b"\x89PNG"

    # Re-running the same run_id resumes: every phase is done, nothing is trained again.
    mtime = (run / "phase00" / "metrics.jsonl").stat().st_mtime
    again = finetune(recipe="demo", storage_root=str(tmp_path), smoke=True, run_id="e2e")
    assert [p["selected"] for p in again["phases"]] == [p["selected"] for p in result["phases"]]
    assert (run / "phase00" / "metrics.jsonl").stat().st_mtime == mtime


def test_training_failure_fails_the_flow_with_the_subprocess_error_in_the_run_log(tmp_path, prefect_server, assets):
    from flows.finetune import finetune

    # flash-attn is not installed on CPU machines: the training subprocess fails at model load.
    state = finetune(
        recipe="demo",
        storage_root=str(tmp_path),
        overrides={"model.attn_implementation": "flash_attention_2", "training.epochs": 0.05},
        run_id="broken",
        return_state=True,
    )
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id)
    assert "flash_attn" in logs or "FlashAttention" in logs
    assert "Traceback" in logs
    checkpoints = Path(tmp_path / "broken" / "phase00" / "checkpoints")
    assert not checkpoints.exists() or all((c / "meta.json").exists() for c in checkpoints.iterdir())


def test_a_failed_gate_fails_the_flow_after_writing_why(tmp_path, prefect_server, assets):
    from flows.finetune import finetune

    state = finetune(
        recipe="demo",
        storage_root=str(tmp_path),
        smoke=True,
        overrides={"phases.0.min_score": {"lab_instruction/rule_acc": 1.01}},
        run_id="gated",
        return_state=True,
    )
    assert state.is_failed()
    assert "lab_instruction/rule_acc" in str(state.message) or "gate failed" in flow_logs(state.state_details.flow_run_id)
    selection = json.loads((tmp_path / "gated" / "phase00" / "selection.json").read_text())
    assert selection["gate"]["passed"] is False
    assert any("missed by" in r for r in selection["gate"]["reasons"])
    assert not (tmp_path / "gated" / "phase05").exists()  # the next phase never started
