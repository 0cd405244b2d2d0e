"""A checkpoint behind an OpenAI-compatible server, for the server backends of evaluation.

    vllm                `vllm serve <view> --data-parallel-size N`, from vLLM's own environment
                        (server.vllm_executable; it pins its own torch / transformers, so it is
                        not a dependency of this project: `uv tool install vllm==0.33.0`)
    transformers-serve  `transformers serve <view>` from this environment (CPU or GPU; no prompt
                        logprobs, so multiple-choice tasks stay on HF in the worker)

The server serves a *view* of the checkpoint: a directory linking its weights and config, with the
tokenizer saved after the recipe's chat template is applied (`model.chat_template`) and a
generation_config.json that stops at the template's end-of-turn token(s) and EOS and pads with a
real id, as the HF path configures the loaded model (core.chat.generation_settings). So the
server applies the same template, stops at the same ids, and is asked for the same number of new
tokens as the HF path generates.

The server runs as a child of the evaluation worker (its process group, so the one owner of the
workers kills it with them), is started per checkpoint and stopped when the checkpoint is done.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from core.chat import apply_template, generation_settings
from core.recipe import ServerConfig
from training.lifetime import stop_with

HEALTH_POLL_S = 0.5
STOP_GRACE_S = 30


class ServerFailed(RuntimeError):
    """The server exited or did not become healthy in time; the message holds its last log lines."""


class ServerEndpoint(BaseModel):
    """A running server as its clients need it."""

    base_url: str = Field(description="http://127.0.0.1:<port>/v1")
    model: str = Field(description="The model name requests carry (the served view's path).")
    prompt_logprobs: bool = Field(description="Returns prompt logprobs (loglikelihood tasks): vLLM does.")
    num_concurrent: int
    tokenizer: str = Field(description="The view's tokenizer directory, for client-side tokenization.")


def served_view(checkpoint: str, chat_template: str | None, out: Path) -> Path:
    """`out` as the checkpoint with the recipe's chat template and the HF path's generation settings."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    source = Path(checkpoint)
    for path in source.iterdir():
        if path.name == "config.json" or ".safetensors" in path.name:
            (out / path.name).symlink_to(path.resolve())
    tokenizer = apply_template(AutoTokenizer.from_pretrained(checkpoint), chat_template, checkpoint)
    tokenizer.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(checkpoint)
    except OSError:  # the checkpoint has none
        generation = GenerationConfig()
    generation.update(**generation_settings(generation, tokenizer, AutoConfig.from_pretrained(checkpoint)))
    generation.save_pretrained(out)
    return out


def server_command(backend: str, view: Path, port: int, gpus: int, config: ServerConfig) -> list[str]:
    """The server's command line on 127.0.0.1:`port` over `gpus` GPUs (data parallel)."""
    if backend == "vllm":
        return [
            config.vllm_executable,
            "serve",
            str(view),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-parallel-size",
            str(max(1, gpus)),
            "--chat-template",
            str(view / "chat_template.jinja"),
            "--generation-config",
            str(view),
            *config.extra_args,
        ]
    device = "cuda" if gpus else "cpu"
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(view), "--host", "127.0.0.1"] + [
        "--port",
        str(port),
        "--device",
        device,
        *config.extra_args,
    ]


def visible_gpu_count() -> int:
    """GPUs of this process's share (CUDA_VISIBLE_DEVICES, as its owner set it)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([gpu for gpu in listed.split(",") if gpu.strip()])
    import torch

    return torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(view: Path, backend: str, config: ServerConfig, log_path: Path) -> Iterator[ServerEndpoint]:
    """Start the server on this process's GPUs, wait for /health, yield its endpoint, stop it."""
    port, gpus = free_port(), visible_gpu_count()
    command = server_command(backend, view, port, gpus, config)
    with open(log_path, "a") as log:
        log.write(f"server: {' '.join(command)}\n")
        log.flush()
        parent = os.getpid()  # the worker: its server ends with it, even when the worker is killed
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: stop_with(parent))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, config.startup_timeout_s, log_path)
        yield ServerEndpoint(
            base_url=f"http://127.0.0.1:{port}/v1",
            model=str(view),
            prompt_logprobs=backend == "vllm",
            num_concurrent=config.num_concurrent,
            tokenizer=str(view),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"server exited ({proc.returncode}) before answering {url}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerFailed(f"server did not answer {url} within {timeout_s:.0f} s:\n{tail(log_path)}")
        time.sleep(HEALTH_POLL_S)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log (nothing when it was never written)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.strip().splitlines()[-lines:])
