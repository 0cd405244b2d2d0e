"""Shared fixtures. Offline by construction: nothing here may reach a model hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Set before transformers / prefect are imported anywhere.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "RECIPE_LAB_CACHE": str(REPO / ".cache" / "recipe-lab"),
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="recipe-lab-prefect-"))
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="recipe-lab-hf-"))

import pytest  # noqa: E402


def mt_bench_settings(judge_base_url: str, key_env: str, **overrides) -> dict:
    """An `evaluation.mt_bench` block on the shared MT-Bench files, judged at `judge_base_url`."""
    mt = SHARED / "mt_bench"
    return {
        "question_file": str(mt / "question.jsonl"),
        "judge_prompt_file": str(mt / "judge_prompts.jsonl"),
        "reference_file": str(mt / "reference_answer_gpt-4.jsonl"),
        "judge_base_url": judge_base_url,
        "judge_model": "judge-test",
        "judge_api_key_env": key_env,
    } | overrides


BUCKET = "lab-bucket"  # the bucket the `s3` fixture creates
SECRET = "moto-secret-never-logged"  # its secret key: tests check it never reaches a file or log


@pytest.fixture(scope="session")
def assets():
    """The embedded lab (tiny base model + curriculum), built once and cached across runs."""
    from embedded import build_assets

    return build_assets()


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.base_model_dir)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API (its own SQLite db) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server with BUCKET, one per session (moto's store is per process, so a second
    server would see the same buckets); yields the environment (credentials and endpoint only
    in the env). Tests keep to their own prefixes."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield env
    server.stop()


@pytest.fixture(scope="session")
def prepared_slice(tmp_path_factory, assets, tokenizer):
    """prepared_slice(phase, n) -> directory of the first n train samples of a lab phase,
    prepared for training (built once per session)."""
    from itertools import islice

    from training.data import load_phase, prepare

    built: dict[tuple[str, int], str] = {}

    def make(phase: str, n: int) -> str:
        if (phase, n) not in built:
            tmp = tmp_path_factory.mktemp(f"{phase}-{n}")
            with open(assets.train_file(phase)) as f:
                (tmp / "train.jsonl").write_text("".join(islice(f, n)))
            conversations, files = load_phase([str(tmp / "train.jsonl")])
            prepare(conversations, tokenizer, str(tmp / "prepared"), max_seq_len=256, files=files)
            built[(phase, n)] = str(tmp / "prepared")
        return built[(phase, n)]

    return make


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, assets):
    """{family: model directory}: tiny random models of real families with their real chat
    templates and special tokens (tests/zoo.py), built once per session."""
    from tests.zoo import build_zoo

    return build_zoo(assets.base_model_dir, tmp_path_factory.mktemp("zoo"))
