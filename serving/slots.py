"""Worker slots: a small file the workers of one service map, one slot (pid, count) per worker.

What a worker publishes there, the others read without a message or a lock: its active
connections (serving/balance.py), until when its runtime counts as busy (serving/cores.py).
BentoML 1.4.39 gives the workers of a service no channel of their own, and a shared file costs a
memory write to publish and a read to look.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

# Slots in the shared file: workers of one service, indexed by BentoML's worker_index (1-based).
MAX_WORKERS = 1024
SLOT = struct.Struct("<qq")  # pid, count


class Board:
    """The service's workers' counts of one kind, in a file every worker maps: one slot
    (pid, count) per worker index. A slot whose process has ended is not counted."""

    def __init__(self, path: Path, index: int) -> None:
        if not 1 <= index <= MAX_WORKERS:
            raise ValueError(f"worker index {index} is outside 1..{MAX_WORKERS}")
        self.index = index
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOT.size * MAX_WORKERS:
                os.ftruncate(fd, SLOT.size * MAX_WORKERS)  # zeros: no worker yet
            self.map = mmap.mmap(fd, SLOT.size * MAX_WORKERS)
        finally:
            os.close(fd)
        # (pid, count) rows over the same memory, for a look at every slot in one numpy call.
        self.slots = np.frombuffer(self.map, dtype="<i8").reshape(MAX_WORKERS, 2)
        self.pid = os.getpid()
        self.publish(0)

    def publish(self, count: int) -> None:
        SLOT.pack_into(self.map, SLOT.size * (self.index - 1), self.pid, count)

    def counts(self) -> list[int]:
        """Each live worker's count, this one's included."""
        found = []
        for offset in range(0, len(self.map), SLOT.size):
            pid, count = SLOT.unpack_from(self.map, offset)
            if pid and (pid == self.pid or process_alive(pid)):
                found.append(count)
        return found

    def others_above(self, value: int) -> bool:
        """Whether a live worker other than this one has a count above `value`. A few
        microseconds: asked before each call that might take every core."""
        above = np.flatnonzero(self.slots[:, 1] > value)
        return any(process_alive(int(self.slots[row, 0])) for row in above
                   if row != self.index - 1 and self.slots[row, 0])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def board_path(directory: str | None, service: str, kind: str = "connections") -> Path:
    """The file the service's workers share for counts of `kind`: in BentoML's per-run metrics
    directory when it is set (emptied at each `bentoml serve`), else the temporary directory;
    named by the serving process (the workers' parent) and the service, so that two servers
    never share one."""
    import tempfile

    base = Path(directory) if directory else Path(tempfile.gettempdir())
    return base / f"{kind}-{os.getppid()}-{service}.slots"
