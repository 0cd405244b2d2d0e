"""Waiting on an event in a test: poll for it with a timeout (never a fixed sleep)."""

import time


def poll(condition, timeout_s: float, interval_s: float = 0.2):
    """condition()'s first truthy value, polled until `timeout_s`; None if it never came."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)
