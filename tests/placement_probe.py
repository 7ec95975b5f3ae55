"""What a worker of a placement pool reports about itself: kept apart from test_placement.py so that a spawned
worker unpickling it imports nothing heavy (no torch)."""

import os


def where_am_i(barrier) -> tuple[int, str | None]:
    barrier.wait(timeout=60)  # every worker holds a task at once: each of them answers
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")
