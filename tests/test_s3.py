"""An s3:// storage root against a local moto S3 server: a finetune run's checkpoints, eval
results, report and Prefect results land in the bucket; a flow process killed in the middle of
a checkpoint upload is re-run to completion with nothing lost, nothing duplicated and no
incomplete checkpoint ever selected; keep_last_n prunes the bucket too; `lab eval` lists the
run's checkpoints from the bucket."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows import serve
from tests.conftest import BUCKET, SECRET
from tests.stack import prefect_server, processes_mentioning
from tests.waiting import poll

pytestmark = pytest.mark.slow

# One short phase (4 checkpoints, the newest 3 kept) on the embedded lab: the S3 paths, not the
# learning, are tested.
OVERRIDES = {
    "phases": [
        {
            "name": "phase00",
            "data": ["embedded://curriculum/phase00/train.jsonl"],
            "objective": {"lab_instruction/rule_acc": 1.0},
        }
    ],
    "training.epochs": 0.25,
    "checkpointing.save_every_samples": 128,
    "checkpointing.keep_last_n": 3,
    "evaluation.limit": 10,
}
# Runs a flow (FLOW: finetune or evaluate) in its own process; with KILL_AT_PUT=n it SIGKILLs
# itself as its n-th file upload starts.
RUNNER = """
import json, os, signal, sys
kill_at = int(os.environ.get("KILL_AT_PUT", "0"))
if kill_at:
    import s3fs
    real, calls = s3fs.S3FileSystem._put_file, []
    async def put_file(self, lpath, rpath, **kwargs):
        calls.append(rpath)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, lpath, rpath, **kwargs)
    s3fs.S3FileSystem._put_file = put_file
from flows.evaluate import evaluate
from flows.finetune import finetune
from pydantic_core import to_json  # the flows return pydantic models
flow = {"finetune": finetune, "evaluate": evaluate}[os.environ["FLOW"]]
print("RESULT " + to_json(flow(**json.loads(sys.argv[1]))).decode())
"""


def bucket_files(prefix: str) -> dict[str, int]:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return {path.removeprefix(prefix + "/"): info["size"] for path, info in fs.find(prefix, detail=True).items()}


def run_flow(
    params: dict, env: dict[str, str], log: Path, kill_at_put: int = 0, flow: str = "finetune"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(params)],
        cwd=serve.REPO,
        env={**env, "KILL_AT_PUT": str(kill_at_put), "FLOW": flow},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        timeout=420,
    )


def checkpoint_files(run_prefix: str) -> dict[str, dict[str, int]]:
    """Remote checkpoints: name -> {file: size}."""
    found: dict[str, dict[str, int]] = {}
    for path, size in bucket_files(f"{run_prefix}/phase00/checkpoints").items():
        name, _, file = path.partition("/")
        found.setdefault(name, {})[file] = size
    return found


def assert_no_incomplete_checkpoint_is_complete_looking(run_prefix: str, mirror: Path) -> None:
    """A remote checkpoint with meta.json has every file of the local one, at the same size."""
    for name, files in checkpoint_files(run_prefix).items():
        if "meta.json" in files:
            local = {p.name: p.stat().st_size for p in (mirror / "phase00" / "checkpoints" / name).iterdir()}
            assert files == local, name


def test_s3_run_killed_mid_upload_then_rerun_loses_and_duplicates_nothing(s3, tmp_path, assets):
    root = f"s3://{BUCKET}/lab"
    run_prefix = f"{BUCKET}/lab/s3run"
    staging = tmp_path / "staging"
    mirror = staging / "s3" / run_prefix
    with prefect_server(tmp_path) as env:
        env = {**env, **s3, "RECIPE_LAB_STAGING": str(staging)}
        results = serve.use_result_storage(root, env)
        params = {"recipe": "demo", "overrides": OVERRIDES, "storage_root": root, "run_id": "s3run"}

        # Killed as the 3rd file upload starts: the first checkpoint is half uploaded.
        killed = run_flow(params, env, tmp_path / "killed.log", kill_at_put=3)
        assert killed.returncode == -9, (tmp_path / "killed.log").read_text()[-3000:]
        partial = checkpoint_files(run_prefix)
        assert partial and all("meta.json" not in files for files in partial.values()), partial
        # The orphaned training dies on its broken stdout pipe; the re-run must not race it.
        assert poll(lambda: not processes_mentioning(str(mirror)), timeout_s=60), processes_mentioning(str(mirror))

        rerun = run_flow(params, env, tmp_path / "rerun.log")
        log = (tmp_path / "rerun.log").read_text()
        assert rerun.returncode == 0, log[-3000:]
        result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])

        # `lab eval` on the run in the bucket: its complete checkpoints listed remotely, results reused.
        evaluated = run_flow({"targets": [f"{root}/s3run"]}, env, tmp_path / "eval.log", flow="evaluate")
        eval_log = (tmp_path / "eval.log").read_text()
        assert evaluated.returncode == 0, eval_log[-3000:]
        rows = json.loads(eval_log.split("RESULT ", 1)[1].splitlines()[0])
    assert result["run_uri"] == f"{root}/s3run"

    # keep_last_n = 3 of the 4 checkpoints; every complete local checkpoint is in the bucket,
    # whole, and nothing else is (the pruned one was deleted there too).
    local = {
        p.name: {f.name: f.stat().st_size for f in p.iterdir()}
        for p in (mirror / "phase00" / "checkpoints").iterdir()
        if (p / "meta.json").exists()
    }
    written = list(dict.fromkeys(re.findall(r"\bcheckpoint (samples_\d+)", log)))  # training's announcements, in order
    assert len(written) == 4, written
    assert sorted(local, key=lambda n: int(n.removeprefix("samples_"))) == written[1:]
    assert f"keep_last_n=3 deleted {written[0]}" in log
    assert checkpoint_files(run_prefix) == local
    assert [row["checkpoint"] for row in rows] == written[1:]
    assert_no_incomplete_checkpoint_is_complete_looking(run_prefix, mirror)

    files = bucket_files(run_prefix)
    for name in ["base", *local]:
        assert f"phase00/eval/{name}/lm_eval.json" in files
    for report in ("summary.md", "summary.csv", "results.parquet", "training.png", "scores.png"):
        assert f"report/{report}" in files
    assert {
        "manifest.json",
        "phase00/selection.json",
        "phase00/trained.json",
        "phase00/metrics.jsonl",
        "data/phase00/tokens.parquet",
    } <= set(files)
    assert not any(f.startswith("phase00/state") for f in files)  # the rolling state stays in staging

    import fsspec

    selection = json.loads(fsspec.open(f"{root}/s3run/phase00/selection.json").open().read())
    for candidate in [selection["winner"], *selection["candidates"]]:
        if candidate["checkpoint"] != selection["start"]["checkpoint"]:  # the start model may win
            assert candidate["checkpoint"] == f"{root}/s3run/phase00/checkpoints/{candidate['name']}"
            assert candidate["name"] in local
    assert bucket_files(results.removeprefix("s3://")), "Prefect results were not persisted on the root"
    # credentials only ever come from the environment: in no object, in no log
    small = [
        p for p, size in files.items() if size < 2_000_000 and not p.endswith((".parquet", ".png", ".safetensors"))
    ]
    for path in small:
        assert SECRET not in fsspec.open(f"s3://{run_prefix}/{path}").open().read().decode(errors="replace"), path
    assert SECRET not in log


def test_checkpoints_download_for_evaluation_refuse_when_incomplete_and_prune_meta_first(s3, tmp_path, monkeypatch):
    import fsspec

    from core import storage

    monkeypatch.setenv("RECIPE_LAB_STAGING", str(tmp_path / "staging"))
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"w" * 1000)
    (source / "meta.json").write_text("{}")
    uri = f"s3://{BUCKET}/dl/run/phase00/checkpoints/samples_64"
    assert storage.upload_tree(source, uri) == 2
    assert storage.upload_tree(source, uri) == 0  # a retry sends nothing twice

    local = Path(storage.local_checkpoint(uri))
    assert local == tmp_path / "staging" / "s3" / BUCKET / "dl/run/phase00/checkpoints/samples_64"
    assert (local / "model.safetensors").read_bytes() == b"w" * 1000 and (local / "meta.json").exists()

    incomplete = f"s3://{BUCKET}/dl/run/phase00/checkpoints/samples_128"
    with fsspec.open(f"{incomplete}/model.safetensors", "wb") as f:
        f.write(b"w")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        storage.local_checkpoint(incomplete)

    fs, _ = storage.filesystem(uri)  # the cached instance remove_tree will use
    deleted, real_rm = [], fs.rm_file
    monkeypatch.setattr(fs, "rm_file", lambda path: deleted.append(path) or real_rm(path))
    storage.remove_tree(uri)
    assert deleted[0].endswith("samples_64/meta.json") and not bucket_files(
        f"{BUCKET}/dl/run/phase00/checkpoints/samples_64"
    )
