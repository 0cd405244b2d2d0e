"""Evaluation processes: workers that evaluate one model at a time, and their one owner.

    python -m evaluation.worker <log file>      (WorkItems on stdin, one JSON per line)

A worker imports its libraries once, then per request runs the recipe's suites that have no
result file yet (<eval>/lm_eval.json, <eval>/mt_bench_answers.jsonl: exactly what a re-run or
`lab eval` reuses) on the model, and replies with an `EvaluationRecord` (when, which pid, the
error if any). With a server backend (evaluation.backend vllm / transformers-serve) it serves
the checkpoint first (evaluation.server: the server is its child, stopped when the model is
done) and evaluates through it. A failed evaluation ends its worker: what it held goes with it.
Model memory is released after each model (the worker keeps only its imports).

`EvaluationWorkers` is the one owner of these processes: the flow run creates it and kills every
process it started when the run ends, however it ends (a run killed with SIGKILL cannot: its
workers watch its process and exit with it, training.lifetime). It holds slots (shares of the machine: an
environment with CUDA_VISIBLE_DEVICES / OMP_NUM_THREADS), each with at most one worker, started
when first needed and reused by later models and phases. `evaluate` takes a free slot (a started
worker first: a new one pays its imports, ~6 CPU-s, about two lab evaluations, so it starts only
while more than one model waits or nothing else is running), runs one model, and gives the slot
back. Slots on training's resources join when a phase's training ends and leave before the next
one starts; their workers exit then if they hold GPUs.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core import records, storage
from core.chat import apply_template, configure_generation
from core.recipe import Recipe
from core.records import EvaluationRecord
from evaluation import lm_eval_runner, mt_bench, server
from evaluation.device import load_causal_lm
from training.lifetime import end_with_owner

LM_EVAL_FILE = "lm_eval.json"
MT_BENCH_ANSWERS_FILE = "mt_bench_answers.jsonl"


class EvaluationFailed(RuntimeError):
    """An evaluation failed in its worker (the message holds its error) or the worker died."""


class EvalRequest(BaseModel):
    recipe: Recipe
    name: str = Field(description="samples_<N>, base, ...: the model's directory under <phase>/eval/.")
    uri: str
    samples: int
    eval_dir: str


class WorkItem(BaseModel):
    """One line of a worker's stdin: a request, and the log its output goes to (a reused worker
    serves phase after phase, each with its own log)."""

    request: EvalRequest
    log: str


def run_lm_eval(
    recipe: Recipe, uri: str, samples: int, out: str, endpoint: server.ServerEndpoint | None = None
) -> dict[str, Any]:
    """lm-eval on the model at `uri` (one load for all tasks, or through `endpoint`) into `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = None
        if any(t in lm_eval_runner.LAB_TASKS + lm_eval_runner.LAB_TEST_TASKS for t in recipe.evaluation.tasks):
            curriculum = Path(storage.resolve_embedded("embedded://curriculum/"))
            task_dir = lm_eval_runner.write_lab_tasks(Path(tmp), curriculum, recipe.evaluation.max_gen_tokens)
        return lm_eval_runner.evaluate_checkpoint(
            storage.local_checkpoint(uri),
            recipe.evaluation,
            task_dir,
            out,
            uri,
            samples,
            chat_template=recipe.model.chat_template,
            server=endpoint,
        )


def run_mt_bench_answers(recipe: Recipe, uri: str, out: str, endpoint: server.ServerEndpoint | None = None) -> int:
    """MT-Bench answers (both turns) of the model at `uri` (or through `endpoint`) into `out` (JSONL)."""
    config = recipe.evaluation.mt_bench
    questions = mt_bench.load_mt_bench(config).questions
    if endpoint is not None:
        answers = mt_bench.generate_answers_from_server(
            endpoint.base_url, endpoint.model, questions, config, endpoint.num_concurrent
        )
    else:
        from transformers import AutoTokenizer

        path = storage.local_checkpoint(uri)
        tokenizer = apply_template(AutoTokenizer.from_pretrained(path), recipe.model.chat_template, uri)
        llm = load_causal_lm(path, recipe.evaluation.device)  # batched generation on the GPU when there is one
        configure_generation(llm, tokenizer)  # a base model's own config may stop at EOS only
        answers = mt_bench.generate_answers(llm, tokenizer, questions, config)
    mt_bench.write_answers(answers, out)
    return len(answers)


def evaluate(request: EvalRequest, log_path: Path) -> None:
    """Every suite of the recipe that has no result file yet, in this process or through a server
    of the model started for it."""
    recipe = request.recipe
    lm_eval_out = storage.join(request.eval_dir, LM_EVAL_FILE)
    answers_out = storage.join(request.eval_dir, MT_BENCH_ANSWERS_FILE)
    lm_eval_due = not storage.exists(lm_eval_out)
    answers_due = recipe.evaluation.mt_bench is not None and not storage.exists(answers_out)
    if recipe.evaluation.backend in ("vllm", "transformers-serve") and (lm_eval_due or answers_due):
        with tempfile.TemporaryDirectory(prefix="served-") as tmp:
            view = server.served_view(storage.local_checkpoint(request.uri), recipe.model.chat_template, Path(tmp))
            with server.serve(view, recipe.evaluation.backend, recipe.evaluation.server, log_path) as endpoint:
                if lm_eval_due:
                    run_lm_eval(recipe, request.uri, request.samples, lm_eval_out, endpoint)
                if answers_due:
                    run_mt_bench_answers(recipe, request.uri, answers_out, endpoint)
        return
    if lm_eval_due:
        run_lm_eval(recipe, request.uri, request.samples, lm_eval_out)
    if answers_due:
        run_mt_bench_answers(recipe, request.uri, answers_out)


def release_memory() -> None:
    """The model of the last evaluation is gone: return its (GPU) memory."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def redirect_output(log_path: str) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)


def main(argv: list[str] | None = None) -> None:
    """Serve WorkItems from stdin, one per line; reply with an EvaluationRecord per item on stdout.
    Every other output (the libraries', a server's) goes to the log file the item names. After a
    failed evaluation the worker exits."""
    (log_path,) = sys.argv[1:] if argv is None else argv
    end_with_owner()  # mid-evaluation too, a killed run's worker ends with it (training.lifetime)
    protocol = os.fdopen(os.dup(1), "w")
    redirect_output(log_path)
    for line in sys.stdin:
        item = WorkItem.model_validate_json(line)
        if item.log != log_path:
            log_path = item.log
            redirect_output(log_path)
        started, t0 = datetime.now(UTC).isoformat(), time.perf_counter()
        error = None
        try:
            evaluate(item.request, Path(log_path))
        except Exception:
            error = traceback.format_exc()
            traceback.print_exc()
        release_memory()
        record = EvaluationRecord(
            model=item.request.name,
            started=started,
            finished=datetime.now(UTC).isoformat(),
            pid=os.getpid(),
            seconds=round(time.perf_counter() - t0, 2),
            error=error,
        )
        protocol.write(records.dumps(record) + "\n")
        protocol.flush()
        if error is not None:
            sys.exit(1)


class Worker:
    """One `python -m evaluation.worker` process, in a process group of its own (so that it and a
    server it started are killed together), serving one request at a time."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evaluation.worker", str(log_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def evaluate(self, request: EvalRequest, log_path: Path) -> EvaluationRecord:
        """Run one model; raise EvaluationFailed with its error (or the log's tail if the worker died)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(WorkItem(request=request, log=str(log_path)).model_dump_json() + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, ValueError):  # it died (or was killed) meanwhile
            line = ""
        if not line:
            self.proc.wait()
            raise EvaluationFailed(
                f"evaluation of {request.name} failed: its worker exited ({self.proc.returncode}):\n"
                + server.tail(log_path)
            )
        record = records.parse(EvaluationRecord, line, f"the evaluation worker's reply for {request.name}")
        if record.error is not None:
            self.proc.wait()
            raise EvaluationFailed(f"evaluation of {request.name} failed:\n{record.error.strip()}")
        return record

    def close(self) -> None:
        """Let it finish: its loop ends when its stdin does."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()

    def kill(self) -> None:
        """Its whole process group (a server it started included)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


class Slot:
    """A share of the machine for one worker: its environment updates, and the group it belongs to
    (`reserved` for evaluation.devices, `training` for training's resources once it ended)."""

    def __init__(self, name: str, group: str, env: dict[str, str]) -> None:
        self.name, self.group, self.env = name, group, env
        self.worker: Worker | None = None
        self.busy = False
        self.open = True

    @property
    def holds_gpus(self) -> bool:
        return bool(self.env.get("CUDA_VISIBLE_DEVICES"))


class EvaluationWorkers:
    """The one owner of a flow run's evaluation processes (see the module docstring). Thread-safe:
    each evaluation task run calls `evaluate` from its own thread. A context manager: on exit every
    process it started is killed."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self._slots: list[Slot] = []
        self._cond = threading.Condition()
        self._waiting = 0
        self._closed = False
        self._timeline_lock = threading.Lock()

    def __enter__(self) -> EvaluationWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def open_slots(self, group: str, envs: list[dict[str, str]]) -> None:
        """Make these shares available (a slot closed before with the same environment reopens, its
        worker still started when it holds no GPU)."""
        with self._cond:
            for env in envs:
                same = [s for s in self._slots if s.group == group and s.env == env and not s.open]
                if same:
                    same[0].open = True
                else:
                    self._slots.append(Slot(f"{group}-{len(self._slots)}", group, env))
            self._cond.notify_all()

    def close_slots(self, group: str) -> None:
        """Take these shares back (training needs them); workers holding GPUs exit now. Call it
        when none of them is busy (a phase's evaluations are all done)."""
        with self._cond:
            closing = [s for s in self._slots if s.group == group and s.open]
            for slot in closing:
                slot.open = False
        for slot in closing:
            if slot.holds_gpus and slot.worker is not None:
                slot.worker.close()
                slot.worker = None

    def evaluate(self, request: EvalRequest, log_dir: Path) -> EvaluationRecord:
        """Evaluate one model in a worker (waiting for a slot); append its record to
        <log_dir>/evaluations.jsonl. A failure kills that worker (the slot starts a fresh one)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        slot = self._take()
        log_path = log_dir / f"eval-worker-{slot.name}.log"
        try:
            with self._cond:  # started under the lock: `kill` either sees it or it sees `kill`
                if self._closed:
                    raise EvaluationFailed("the run's evaluation workers were stopped")
                if slot.worker is None or not slot.worker.alive():
                    slot.worker = Worker({**os.environ, **slot.env}, log_path)
            record = slot.worker.evaluate(request, log_path)
        except BaseException:
            if slot.worker is not None:
                slot.worker.kill()
                slot.worker = None
            raise
        finally:
            with self._cond:
                slot.busy = False
                self._cond.notify_all()
        record = record.model_copy(update={"slot": slot.name})
        with self._timeline_lock, open(log_dir / records.EVALUATIONS, "a") as f:
            f.write(records.dumps(record) + "\n")
        return record

    def _take(self) -> Slot:
        with self._cond:
            self._waiting += 1
            try:
                while (slot := self._choose()) is None:
                    if self._closed:
                        raise EvaluationFailed("the run's evaluation workers were stopped")
                    self._cond.wait()
            finally:
                self._waiting -= 1
            slot.busy = True
            return slot

    def _choose(self) -> Slot | None:
        if self._closed:
            return None
        free = [s for s in self._slots if s.open and not s.busy]
        started = [s for s in free if s.worker is not None and s.worker.alive()]
        if started:
            return started[0]
        running = any(s.open and s.busy for s in self._slots)
        return free[0] if free and (not running or self._waiting > 1) else None

    def kill(self) -> None:
        """Every worker (and its server) now; waiting evaluations fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            workers = [s.worker for s in self._slots if s.worker is not None]
        for worker in workers:
            worker.kill()


if __name__ == "__main__":
    main()
