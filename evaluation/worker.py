"""Evaluate models beside training: worker processes, each one model at a time.

    python -m evaluation.worker <log file>      (WorkItems on stdin, one JSON per line)

runs each model's lm-eval tasks (one model load) and, when the recipe has MT-Bench, its answers,
writing exactly the files the finetune flow's evaluation tasks write (<eval>/lm_eval.json,
<eval>/mt_bench_answers.jsonl); a file already present is kept. Those tasks then reuse the
files, so scores and files are those of sequential evaluation. Judging is network-bound, not
the worker's: the owner's `on_evaluated` callback hears of each finished model (the finetune
task judges its answers there, on a thread).

`BackgroundEvaluator` queues models as their checkpoints complete and feeds them, in order, to
persistent worker processes (each imports its libraries once) in their own process groups on
`evaluation.devices` (e.g. one CPU thread, one GPU), so that evaluation overlaps training; its
owner adds workers on the training's resources once training ends, and kills them all with the
training on any failure. The worker on `evaluation.devices` outlives its evaluator: it waits,
idle, for the next evaluator with the same environment (the run's next phase), which then skips
the worker's start (~6 CPU-s of imports on a CPU). An idle worker ends after
IDLE_WORKER_SECONDS, or when this process exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core import storage
from core.chat import apply_template, configure_generation
from core.recipe import Recipe
from evaluation import lm_eval_runner, mt_bench
from evaluation.device import load_causal_lm
from training.lifetime import end_with_owner

LM_EVAL_FILE = "lm_eval.json"
MT_BENCH_ANSWERS_FILE = "mt_bench_answers.jsonl"
# <phase>/evaluations.jsonl: when, and by which worker (pid), each background evaluation ran
TIMELINE_FILE = "evaluations.jsonl"


class EvaluationFailed(RuntimeError):
    """A background evaluation exited non-zero; the message holds its last output lines."""


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


Environment = tuple[tuple[str, str], ...]
# Workers on evaluation.devices whose evaluator is done, by environment, waiting for the next
# one (the run's next phase starts within seconds on the lab, minutes on a large dataset). An
# idle worker is ended after IDLE_WORKER_SECONDS, or when this process exits (its stdin closes).
IDLE_WORKER_SECONDS = 300.0
_idle_workers: dict[Environment, list[tuple[subprocess.Popen, object]]] = {}
_idle_lock = threading.Lock()


def _reuse_idle_worker(environment: Environment) -> subprocess.Popen | None:
    with _idle_lock:
        waiting = _idle_workers.get(environment, [])
        while waiting:
            proc, _ = waiting.pop()
            if proc.poll() is None:
                return proc
    return None


def _keep_idle_worker(environment: Environment, proc: subprocess.Popen) -> None:
    entry = (proc, object())  # one stay in the pool: a worker reused and kept again is a new entry
    with _idle_lock:
        _idle_workers.setdefault(environment, []).append(entry)
    timer = threading.Timer(IDLE_WORKER_SECONDS, _end_idle_worker, args=(environment, entry))
    timer.daemon = True
    timer.start()


def _end_idle_worker(environment: Environment, entry: tuple[subprocess.Popen, object]) -> None:
    with _idle_lock:
        if entry not in _idle_workers.get(environment, []):
            return  # reused meanwhile
        _idle_workers[environment].remove(entry)
    proc = entry[0]
    assert proc.stdin is not None
    proc.stdin.close()  # the worker's loop ends on EOF
    proc.wait()


def run_lm_eval(recipe: Recipe, uri: str, samples: int, out: str) -> dict[str, Any]:
    """lm-eval on the model at `uri` (one load for all tasks) into `out`; return what was written."""
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
        )


def run_mt_bench_answers(recipe: Recipe, uri: str, out: str) -> int:
    """MT-Bench answers (both turns) of the model at `uri` into `out` (JSONL); return how many."""
    from transformers import AutoTokenizer

    config = recipe.evaluation.mt_bench
    path = storage.local_checkpoint(uri)
    tokenizer = apply_template(AutoTokenizer.from_pretrained(path), recipe.model.chat_template, uri)
    llm = load_causal_lm(path, recipe.evaluation.device)  # batched generation on the GPU when there is one
    configure_generation(llm, tokenizer)  # a base model's own config may stop at EOS only
    answers = mt_bench.generate_answers(llm, tokenizer, mt_bench.load_mt_bench(config).questions, config)
    mt_bench.write_answers(answers, out)
    return len(answers)


def evaluate(request: EvalRequest) -> None:
    """Every suite of the recipe that has no result file yet."""
    lm_eval_out = storage.join(request.eval_dir, LM_EVAL_FILE)
    if not storage.exists(lm_eval_out):
        run_lm_eval(request.recipe, request.uri, request.samples, lm_eval_out)
    answers_out = storage.join(request.eval_dir, MT_BENCH_ANSWERS_FILE)
    if request.recipe.evaluation.mt_bench is not None and not storage.exists(answers_out):
        run_mt_bench_answers(request.recipe, request.uri, answers_out)


class BackgroundEvaluator:
    """Worker processes (`python -m evaluation.worker`) that evaluate the submitted models in
    order, each worker one model at a time, beside training.

    A worker imports its libraries once and then serves requests: one EvalRequest per line on
    its stdin, one timing record per finished model on its stdout (everything else it prints goes
    to <work_dir>/eval-worker-<i>.log). Each worker runs in a process group of its own with the
    environment it was given (its share of the machine: threads, GPUs). `raise_if_failed`
    surfaces a worker's failure with its last log lines; `kill` ends every worker and drops the
    queue; `wait` blocks until all submitted models are done.
    """

    def __init__(self, work_dir: Path, log: Callable[[str], None]) -> None:
        self.work_dir = work_dir
        self.log = log
        # Set by the owner before submitting: hears of each evaluated model on a serving thread,
        # so it must return quickly.
        self.on_evaluated: Callable[[EvalRequest], None] | None = None
        self.timeline = work_dir / TIMELINE_FILE
        self._queue: deque[EvalRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._killed = False
        self._workers: list[tuple[subprocess.Popen, threading.Thread]] = []
        self._handed_on: list[subprocess.Popen] = []  # kept for the next evaluator: no longer ours to kill
        self.failure: EvaluationFailed | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def add_worker(self, env: dict[str, str], reusable: bool = False) -> None:
        """One more worker process with this environment. A `reusable` one (give it evaluation.devices,
        never the training's resources, which the next phase needs back) is an idle worker with the
        same environment when there is one, and waits for the next evaluator when this one is done."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f"eval-worker-{len(self._workers)}.log"
        environment = tuple(sorted(env.items())) if reusable else None
        with self._cond:
            if self._killed:
                return
            proc = _reuse_idle_worker(environment) if environment else None
            if proc is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "evaluation.worker", str(log_path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    start_new_session=True,  # its own group: killed with the training, never left behind
                )
            thread = threading.Thread(target=self._serve, args=(proc, log_path, environment), daemon=True)
            self._workers.append((proc, thread))
        thread.start()

    def submit(self, request: EvalRequest) -> None:
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait(self) -> None:
        """Block until every submitted model is evaluated; raise the first failure."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for _, thread in self._workers:
            thread.join()
        self.raise_if_failed()

    def kill(self) -> None:
        with self._cond:
            self._killed = self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for proc, _ in self._workers:
            if proc.poll() is None and proc not in self._handed_on:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, thread in self._workers:
            thread.join(timeout=30)

    def _serve(self, proc: subprocess.Popen, log_path: Path, environment: Environment | None) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue or self._killed or self.failure is not None:
                    break
                request = self._queue.popleft()
            try:
                proc.stdin.write(WorkItem(request=request, log=str(log_path)).model_dump_json() + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, ValueError):  # the worker died (or was killed) meanwhile
                line = ""
            if not line:
                proc.wait()
                if not self._killed:
                    tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-30:])
                    self.failure = EvaluationFailed(
                        f"evaluation of {request.name} failed (exit {proc.returncode}):\n{tail}"
                    )
                return
            record = json.loads(line)
            with self._cond, open(self.timeline, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.log(f"{request.name}: evaluated beside training in {record['seconds']:.1f}s -> {request.eval_dir}")
            if self.on_evaluated is not None:
                self.on_evaluated(request)
        with self._cond:
            if self._killed:  # kill() ends it
                return
            if environment is not None:
                self._handed_on.append(proc)
                _keep_idle_worker(environment, proc)
                return
        proc.stdin.close()
        proc.wait()


def redirect_output(log_path: str) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)


def main(argv: list[str] | None = None) -> None:
    """Serve WorkItems from stdin, one per line; report each finished one on stdout. Every other
    output (the libraries', a traceback) goes to the log file named by the argument until a work
    item names another."""
    (log_path,) = sys.argv[1:] if argv is None else argv
    end_with_owner()  # mid-evaluation too, a killed run's worker ends with it (training.lifetime)
    protocol = os.fdopen(os.dup(1), "w")
    redirect_output(log_path)
    for line in sys.stdin:
        item = WorkItem.model_validate_json(line)
        if item.log != log_path:
            log_path = item.log
            redirect_output(log_path)
        request = item.request
        started, t0 = datetime.now(UTC).isoformat(), time.perf_counter()
        evaluate(request)
        record = {
            "model": request.name,
            "started": started,
            "finished": datetime.now(UTC).isoformat(),
            "pid": os.getpid(),
        }
        protocol.write(json.dumps({**record, "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
