"""What a phase's training writes, as typed records: one definition for the writer and every reader.

Under a phase directory (<root>/<run_id>/<phase>/):

    metrics.jsonl                     StepMetrics per optimizer step (a WatchdogStop line last when the watchdog stopped it)
    progress.jsonl                    ProgressEvent per optimizer step: what the launcher tails to report progress
    finished.json                     Finished: the last step is done
    stopped.json                      Stopped: the watchdog's verdict
    preempted.json                    Preempted: a SIGTERM's save was made after this step
    trained.json                      list[ModelRef]: the phase is recorded as trained (written by the phase task)
    evaluations.jsonl                 EvaluationRecord per model evaluated: when, and by which worker (pid)
    checkpoints/samples_<N>/meta.json CheckpointMeta, written last: a directory without it is incomplete
    averaged/<name>/meta.json         AveragedMeta (training.averaging)
    state/progress.json               StateProgress: the step after which the rolling state was saved
    samples/rank<r>.jsonl             SamplesLine per step: the sample ids rank r trained on
    saves/rank<r>.jsonl               SaveLine per save on rank r
and <root>/<run_id>/data/<phase>/stats.json: PrepStats, <root>/<run_id>/manifest.json: Manifest,
<root>/nightly/<recipe>/seed_spread.json: SeedSpread.

On disk each record is `json.dumps` of its `model_dump()` (`dumps`), field order as declared here.
A reader gets the record or a RecordError naming the file (and line) and the field: `parse` /
`parse_lines` take text (a remote file's, read through core.storage), `read` / `read_lines`
a local path; `read_manifest` a run's manifest wherever the run lives. No torch here: the
orchestrating process reads these.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

from core import storage

METRICS = "metrics.jsonl"
PROGRESS = "progress.jsonl"
FINISHED = "finished.json"
STOPPED = "stopped.json"
PREEMPTED = "preempted.json"
TRAINED = "trained.json"
META = "meta.json"
STATE_PROGRESS = "progress.json"
STATS = "stats.json"
MANIFEST = "manifest.json"
EVALUATIONS = "evaluations.jsonl"

T = TypeVar("T")


class RecordError(ValueError):
    """A file that does not hold its record; the message starts with 'file:' or 'file:line:'."""


class Record(BaseModel):
    """A record on disk: unknown fields are an error (a misspelled or foreign file, not a newer writer's extra)."""

    model_config = ConfigDict(extra="forbid")


class StepMetrics(Record):
    """One optimizer step (rank 0). loss: the token mean over the whole step (all micro-batches and ranks)."""

    step: int
    epoch: float
    samples_seen: int
    tokens_seen: int
    loss: float
    grad_norm: float = Field(description="Global, before clipping.")
    lr: float
    tokens_per_s: float = Field(description="Real tokens (padding excluded) over the step's wall time.")
    samples_per_s: float
    mfu: float | None = Field(description="Model FLOPs utilisation; None off a known GPU.")
    padding_efficiency: float
    micro_batches: int = Field(description="Over all ranks.")
    wall_s: float = Field(description="Since this launch started (a resume restarts it).")
    cpu_s: float = Field(description="Rank 0's CPU time since this launch started.")
    peak_memory_gb: float
    time: float = Field(description="Unix time at the end of the step.")


class WatchdogStop(Record):
    """The last line of metrics.jsonl of a run the watchdog stopped."""

    step: int
    samples_seen: int
    stopped: str


def _metrics_kind(line: Any) -> str:
    return "WatchdogStop" if "stopped" in (line if isinstance(line, dict) else vars(line)) else "StepMetrics"


# A line of metrics.jsonl: a step, or the watchdog's verdict (told apart by its "stopped" field).
MetricsLine = Annotated[
    Annotated[StepMetrics, Tag("StepMetrics")] | Annotated[WatchdogStop, Tag("WatchdogStop")],
    Discriminator(_metrics_kind),
]


class ProgressEvent(Record):
    """One optimizer step done, as the launcher reports it to its caller (a progress bar, an artifact)."""

    step: int
    total_steps: int
    samples_seen: int
    epoch: float
    loss: float
    grad_norm: float
    lr: float

    def line(self) -> str:
        """The step's line for people (the run log)."""
        return (
            f"step {self.step}/{self.total_steps} samples {self.samples_seen} loss {self.loss:.4f} "
            f"grad_norm {self.grad_norm:.3f} lr {self.lr:.3g}"
        )


class Finished(Record):
    steps: int
    samples_seen: int


class Stopped(Record):
    step: int
    samples_seen: int
    reason: str


class Preempted(Record):
    step: int
    samples_seen: int


class Probe(Record):
    """The in-training model's log-probability of each next token of a fixed sequence: a reload must reproduce them."""

    input_ids: list[int]
    token_logprobs: list[float]


class CheckpointMeta(Record):
    phase: str
    run_id: str
    samples_seen: int
    step: int
    parent_checkpoint: str = Field(description="URI of the phase's starting model.")
    code_version: str
    metrics: StepMetrics = Field(description="The step's metrics at save time.")
    validation_loss: float | None = Field(
        None,
        description="validation/loss: the mean token loss of the phase's held-out validation slice "
        "(training.validation_samples; per sample in <phase>/validation/samples_<N>.items.parquet); None without one.",
    )
    probe: Probe
    recipe: dict[str, Any] = Field(description="The resolved recipe, as JSON.")


class AveragedMeta(Record):
    phase: str
    samples_seen: int = Field(description="The newest averaged checkpoint's: what the average cost to train.")
    averaged: list[str] = Field(description="The averaged checkpoints' paths.")
    parent_checkpoint: str


class StateProgress(Record):
    step: int
    tokens_seen: int


class SamplesLine(Record):
    step: int
    ids: list[str] = Field(description="This rank's samples of the step, in data-stream order.")


class SaveLine(Record):
    step: int
    what: str = Field(description="checkpoint or state")
    reason: str
    seconds: float
    host_peak_growth_bytes: int | None = Field(description="Peak host memory above the memory at the save's start.")


class ModelRef(Record):
    """A model to evaluate or start from: a checkpoint, or the recipe's base model (trained.json lists these)."""

    name: str = Field(description="samples_<N>, avg_last<k> or base.")
    uri: str
    samples: int
    averaged: bool = Field(False, description="The weight average of the phase's last checkpoints.")

    @classmethod
    def checkpoint(cls, uri: str) -> ModelRef:
        """The checkpoint at `uri` (.../checkpoints/samples_<N>)."""
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return cls(name=name, uri=uri, samples=int(name.removeprefix("samples_")))


class EvaluationRecord(Record):
    """An evaluation worker's reply for one model, and one line of <phase>/evaluations.jsonl."""

    model: str
    started: str
    finished: str
    pid: int = Field(description="The worker process that evaluated the model.")
    slot: str = Field("", description="The share of the machine it ran on (set by the owner).")
    seconds: float
    error: str | None = None


class PrepStats(Record):
    """Data preparation of one phase (training.data.prepare)."""

    files: dict[str, int] = Field(default_factory=dict, description="Rows read per input file.")
    samples: int = 0
    replayed: int = Field(0, description="Samples of earlier phases mixed in (PhaseConfig.replay).")
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    straddling_header: int = Field(
        0,
        description="Samples where a token starts in an answer's header and ends in the answer (e.g. an answer's "
        "leading newline merged with the header's): that token is the prompt's, not trained.",
    )
    tokens: int = 0
    loss_tokens: int = 0
    max_len: int = 0
    mean_len: float = 0.0
    content_hash: str = Field(
        "", description="Of the conversations, tokenizer, template and settings: equal = reusable."
    )
    validation_ids: list[str] = Field(
        default_factory=list,
        description="The phase's held-out validation slice (validation.parquet): never trained on in the phase.",
    )


class PhaseDone(Record):
    """A phase the run has finished: its selection.json has the whole choice."""

    selected: str = Field(description="URI of the selected model.")
    objective: float
    policy: str = Field("", description="The selection policy that chose it (selection.policy); empty in older runs.")
    validation_ids: list[str] = Field(
        default_factory=list,
        description="The phase's held-out validation slice (PrepStats.validation_ids): never trained on in the phase.",
    )


class Manifest(Record):
    """The run's journal (<run>/manifest.json, tasks.finetune.init_run): what it trains and which
    phases are done; a re-run with the same run_id skips those."""

    run_id: str
    created: str = Field(description="UTC time, ISO 8601.")
    code_version: str
    recipe: dict[str, Any] = Field(description="The resolved recipe, as JSON.")
    phases: dict[str, PhaseDone] = Field(default_factory=dict, description="Phases done, in the order they finished.")


class MetricSpread(Record):
    values: list[float] = Field(description="The metric of each seed's run.")
    tolerance: float = Field(description="The regression tolerance derived from them (evaluation.findings).")


class SeedSpread(Record):
    """How much a nightly recipe's selected metrics move with the seed alone (flows.nightly.nightly_seed_spread)."""

    recipe: str
    fingerprint: str = Field(description="Of the measured recipe: another recipe version does not use it.")
    seeds: int
    metrics: dict[str, MetricSpread] = Field(description="<phase>/<metric> -> its spread.")


def dumps(record: BaseModel | list[BaseModel], indent: int | None = None) -> str:
    """The record's JSON as written on disk (json.dumps of model_dump; no trailing newline)."""
    if isinstance(record, list):
        return json.dumps([r.model_dump() for r in record], indent=indent)
    return json.dumps(record.model_dump(), indent=indent)


@cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def _error(where: str, error: ValidationError) -> RecordError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(record)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return RecordError(f"{where}: {field}: {first['msg']}{more}")


def parse(kind: type[T] | Any, text: str, source: str) -> T:
    """The record in `text` (the whole file `source`)."""
    try:
        return _adapter(kind).validate_json(text)
    except ValidationError as error:
        raise _error(source, error) from None


def parse_lines(kind: type[T] | Any, text: str, source: str, first_line: int = 1) -> list[T]:
    """One record per non-blank line of `text` (the JSONL file `source`, from its line `first_line`)."""
    records = []
    for number, line in enumerate(text.splitlines(), first_line):
        if line.strip():
            try:
                records.append(_adapter(kind).validate_json(line))
            except ValidationError as error:
                raise _error(f"{source}:{number}", error) from None
    return records


def read(kind: type[T] | Any, path: Path) -> T:
    return parse(kind, path.read_text(), str(path))


def read_lines(kind: type[T] | Any, path: Path) -> list[T]:
    return parse_lines(kind, path.read_text(), str(path))


def read_manifest(run_uri: str) -> Manifest | None:
    """The manifest of the run at `run_uri` (a directory or URI), or None where no run is."""
    uri = storage.join(run_uri, MANIFEST)
    return parse(Manifest, storage.read_text(uri), uri) if storage.exists(uri) else None
