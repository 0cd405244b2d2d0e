"""Processes a run starts end with the run's process, even when it is killed with SIGKILL.

Training ranks (children of `accelerate launch`) and evaluation workers run in their own process
groups so that the run can stop them as a group; but a run killed with SIGKILL stops nothing,
and a child only noticed at its next write to the closed pipe (a training step, a whole
evaluation later). So the run's process puts its pid in the environment every child inherits
(`OWNER_ENV`), and each long-lived child watches that process: a pidfd becomes readable the
moment the process exits, whatever killed it and whoever its parent is now. (A parent-death
signal would not do: it follows the *thread* that started the child, and an evaluation worker
outlives the thread that started it.)
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading

OWNER_ENV = "RECIPE_LAB_OWNER_PID"


def own_children() -> None:
    """Make this process the owner of every process started from it from now on."""
    os.environ[OWNER_ENV] = str(os.getpid())


def end_with_owner() -> None:
    """Exit as soon as the owner (OWNER_ENV) exits; nothing when no owner is set."""
    owner = int(os.environ.get(OWNER_ENV, "0"))
    if not owner or owner == os.getpid():
        return
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:  # gone already
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once the owner has exited
        os._exit(1)  # the run that wanted this work is gone: nothing to clean up for it

    threading.Thread(target=watch, name="end-with-owner", daemon=True).start()


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing but the call runs in the forked child
PR_SET_PDEATHSIG = 1


def stop_with(parent: int) -> None:
    """preexec_fn of a child that cannot watch its owner itself (a server): SIGTERM it when the
    thread that started it ends (Linux); at once if `parent` died before the signal was set."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
