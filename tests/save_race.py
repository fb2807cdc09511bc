"""A real race between a writer thread that keeps replacing a save and a reader (tests' helper)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def race_saves(
    save: Callable[[float], None], read: Callable[[], float], *, min_reads: int, seconds: float = 60.0
) -> tuple[set[float], int]:
    """Save value 1.0, then let a thread save 2.0, 1.0, 2.0, ... while this thread calls ``read``.

    Reads go on until ``min_reads`` reads have seen both values (or ``seconds`` pass); ``read`` asserts
    what a single read must hold and returns the value it found. Returns the values seen and the reads.
    """
    save(1.0)
    stop = threading.Event()

    def writer() -> None:
        i = 1
        while not stop.is_set():
            save((1.0, 2.0)[i % 2])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    seen, reads, deadline = set(), 0, time.monotonic() + seconds
    try:
        while (reads < min_reads or len(seen) < 2) and time.monotonic() < deadline:
            seen.add(read())
            reads += 1
    finally:
        stop.set()
        thread.join()
    return seen, reads
