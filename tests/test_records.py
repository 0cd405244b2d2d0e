"""The typed records of a phase's files: what is on disk, read back, and a bad file named by file and line."""

import re

import pytest

from core import records
from core.records import (
    CheckpointMeta,
    Finished,
    Manifest,
    MetricsLine,
    ModelRef,
    PhaseDone,
    PrepStats,
    Probe,
    ProgressEvent,
    RecordError,
    StepMetrics,
    WatchdogStop,
)

STEP = StepMetrics(
    step=3,
    epoch=0.48,
    samples_seen=96,
    tokens_seen=2545,
    loss=2.5,
    grad_norm=1.25,
    lr=0.002,
    tokens_per_s=8480.2,
    samples_per_s=106.67,
    mfu=None,
    padding_efficiency=1.0,
    micro_batches=1,
    wall_s=0.9,
    cpu_s=0.8,
    peak_memory_gb=0.5,
    time=1700000000.125,
)


def test_records_are_written_as_the_json_the_files_always_held():
    """The on-disk text, written out by hand: field order and spacing as json.dumps of a dict gives them."""
    assert records.dumps(Finished(steps=25, samples_seen=400)) == '{"steps": 25, "samples_seen": 400}'
    assert records.dumps(WatchdogStop(step=4, samples_seen=128, stopped="loss spike")) == (
        '{"step": 4, "samples_seen": 128, "stopped": "loss spike"}'
    )
    assert records.dumps(STEP).startswith('{"step": 3, "epoch": 0.48, "samples_seen": 96, "tokens_seen": 2545, ')
    assert '"mfu": null' in records.dumps(STEP) and records.dumps(STEP).endswith('"time": 1700000000.125}')
    refs = [ModelRef.checkpoint("/runs/r/p/checkpoints/samples_64")]
    assert records.dumps(refs) == (
        '[{"name": "samples_64", "uri": "/runs/r/p/checkpoints/samples_64", "samples": 64, "averaged": false}]'
    )
    # a trained.json written before ModelRef had `averaged` reads as not averaged
    old = '[{"name": "samples_64", "uri": "/runs/r/p/checkpoints/samples_64", "samples": 64}]'
    assert records.parse(list[ModelRef], old, "trained.json") == refs


@pytest.mark.parametrize(
    "record",
    [
        STEP,
        WatchdogStop(step=4, samples_seen=128, stopped="non-finite loss at step 4 (loss=nan, grad_norm=nan)"),
        ProgressEvent(step=3, total_steps=9, samples_seen=96, epoch=0.48, loss=2.5, grad_norm=1.25, lr=0.002),
        CheckpointMeta(
            phase="phase00",
            run_id="r",
            samples_seen=96,
            step=3,
            parent_checkpoint="/base",
            code_version="abc1234",
            metrics=STEP,
            probe=Probe(input_ids=[1, 2, 3], token_logprobs=[-1.5, -0.25]),
            recipe={"name": "demo", "training": {"epochs": 3}},
        ),
        PrepStats(files={"a.jsonl": 10}, samples=9, dropped_too_long=1, tokens=270, mean_len=30.0, content_hash="x"),
    ],
)
def test_each_record_reads_back_equal_from_what_it_wrote(tmp_path, record):
    path = tmp_path / "record.json"
    path.write_text(records.dumps(record, indent=2) + "\n")
    assert records.read(type(record), path) == record


def test_a_metrics_file_reads_as_its_step_lines_and_the_watchdog_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    stop = WatchdogStop(step=4, samples_seen=128, stopped="loss spike")
    path.write_text(records.dumps(STEP) + "\n\n" + records.dumps(stop) + "\n")  # a blank line is no record
    assert records.read_lines(MetricsLine, path) == [STEP, stop]


@pytest.mark.parametrize(
    ("bad_line", "error"),
    [
        ('{"step": 4, "samples_seen": 128}', "StepMetrics.epoch: Field required (and 13 more)"),
        (
            '{"step": 4, "samples_seen": "many", "stopped": "x"}',
            "WatchdogStop.samples_seen: Input should be a valid integer",
        ),
        (
            '{"step": 4, "samples_seen": 128, "stopped": "x", "extra": 1}',
            "WatchdogStop.extra: Extra inputs are not permitted",
        ),
        ('{"step": 4, "samples_', "(record): Invalid JSON"),
    ],
)
def test_a_reader_rejects_a_malformed_line_naming_the_file_line_and_field(tmp_path, bad_line, error):
    path = tmp_path / "metrics.jsonl"
    path.write_text(records.dumps(STEP) + "\n" + bad_line + "\n")
    with pytest.raises(RecordError, match="^" + re.escape(f"{path}:2: {error}")):
        records.read_lines(MetricsLine, path)


def test_a_malformed_record_file_is_named_with_its_field(tmp_path):
    path = tmp_path / "trained.json"
    path.write_text('[{"name": "samples_64", "uri": "/x/samples_64"}]')
    with pytest.raises(RecordError, match=re.escape(f"{path}: 0.samples: Field required")):
        records.read(list[ModelRef], path)


def test_a_run_manifest_is_read_back_and_a_bad_one_names_its_field(tmp_path):
    assert records.read_manifest(str(tmp_path)) is None  # no run here
    manifest = Manifest(run_id="r", created="2025-01-01T00:00:00+00:00", code_version="abc", recipe={"name": "demo"})
    manifest.phases["p0"] = PhaseDone(selected="/r/p0/checkpoints/samples_64", objective=0.5)
    (tmp_path / records.MANIFEST).write_text(records.dumps(manifest))
    assert records.read_manifest(str(tmp_path)) == manifest
    (tmp_path / records.MANIFEST).write_text(records.dumps(manifest).replace('"objective": 0.5', '"objective": "high"'))
    with pytest.raises(RecordError, match=re.escape(f"{tmp_path / records.MANIFEST}: phases.p0.objective: ")):
        records.read_manifest(str(tmp_path))
