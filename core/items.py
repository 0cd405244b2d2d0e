"""Per-item records: the outcome of every evaluated item, one compact typed file per model and suite.

    <phase>/eval/<model>/lm_eval.items.parquet     beside lm_eval.json (lm-eval's logged samples)
    <phase>/eval/<model>/mt_bench.items.parquet    beside mt_bench.json (per question, on the judge's /10)
    <phase>/validation/<model>.items.parquet       the trainer's validation loss, per held-out sample

Columns: task (str), metric (str, the full "task/metric" key the objective uses), item (str, an id
stable across a run's checkpoints), value (float64). A file is written whole (a temporary file,
then a rename) before the result file it belongs to, so a result file never lacks its items.
Paired comparisons (evaluation/paired.py) read them; training/ writes the validation ones, which
is why the format lives in core/ (below both) and not in evaluation/.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage

SCHEMA = pa.schema([("task", pa.string()), ("metric", pa.string()), ("item", pa.string()), ("value", pa.float64())])
SUFFIX = ".items.parquet"


def items_uri(result_uri: str) -> str:
    """The per-item file beside a result file: .../lm_eval.json -> .../lm_eval.items.parquet."""
    return result_uri.removesuffix(".json") + SUFFIX


def write_items(uri: str, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows {task, metric, item, value} as `uri` (local or fsspec URL), whole or not at all."""
    table = pa.Table.from_pylist(
        [{"task": r["task"], "metric": r["metric"], "item": str(r["item"]), "value": float(r["value"])} for r in rows],
        schema=SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_items(uris: Iterable[str]) -> pd.DataFrame:
    """The rows of every file in `uris`, concatenated (columns task, metric, item, value)."""
    frames = []
    for uri in uris:
        with storage.open_binary(uri) as f:
            frames.append(pq.read_table(f, schema=SCHEMA).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else SCHEMA.empty_table().to_pandas()
