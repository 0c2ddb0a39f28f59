"""A restore's states on their way to the engine child: a file, written as they are read.

The daemon reads a changelog partition in fetches of a few MiB; each fetch's
states are appended to a file (``/dev/shm`` where it has room) by a thread,
in order, while the next fetch is read, and the engine child maps the file
once the read is done. Pickled through the socket, 100k states of 2 KiB cost
more than decoding them; written after the read, 0.13 s more than this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import numpy as np
import numpy.typing as npt

from streamlstm.consumers.engine.protocol import LocalRestore, Restore

__all__ = ["Spool"]


class Spool:
    """States laid end to end in one file; record ``i`` is the ``i``-th value added."""

    def __init__(self, expected_records: int) -> None:
        self._expected = expected_records
        self._fd = -1
        self.path = ""
        self._lengths: list[int] = []
        self._writing: asyncio.Future[None] | None = None

    @property
    def records(self) -> int:
        return len(self._lengths)

    def add(self, values: list[bytes]) -> None:
        """Append ``values`` (written by a thread, after those added before)."""
        if not values:
            return
        if self._fd < 0:
            guess = sum(map(len, values)) * max(self._expected, len(values)) // len(values)
            self._fd, self.path = tempfile.mkstemp(
                prefix="streamlstm-restore-", dir=_directory(guess)
            )
        self._lengths.extend(map(len, values))
        self._writing = asyncio.ensure_future(_append(self._writing, self._fd, values))

    async def written(self) -> npt.NDArray[np.int64]:
        """Every record's length, once all are in the file."""
        if self._writing is not None:
            await self._writing
        return np.array(self._lengths, dtype=np.int64)

    async def restore(
        self, partition: int, rows: dict[str, int], policy: str, local: LocalRestore | None = None
    ) -> Restore:
        """The ``Restore`` of these states (once all are written): stream s's is record
        ``rows[s]``."""
        lengths = await self.written()
        index = np.fromiter(rows.values(), np.int64, len(rows)).tobytes()
        return Restore(partition, list(rows), self.path, lengths.tobytes(), index, policy, local)

    async def close(self) -> None:
        """Remove the file (after its last write: the thread still holds the descriptor)."""
        if self._writing is not None:
            with contextlib.suppress(Exception):  # already raised to whoever waited
                await self._writing
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(FileNotFoundError):  # the child unlinks it once mapped
                os.unlink(self.path)


async def _append(previous: asyncio.Future[None] | None, fd: int, values: list[bytes]) -> None:
    if previous is not None:
        await previous  # in order; a failed write fails the ones after it
    await asyncio.to_thread(_write_all, fd, values)


def _directory(size: int) -> str:
    """Memory-backed ``/dev/shm`` where it has room (containers often give it 64 MiB)."""
    with contextlib.suppress(OSError):
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize > 2 * size + (64 << 20):
            return "/dev/shm"
    return tempfile.gettempdir()


def _write_all(fd: int, values: list[bytes]) -> None:
    """``values`` end to end into ``fd``, without joining them first (one copy, by the kernel)."""
    limit = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
    for lo in range(0, len(values), limit):
        chunk = values[lo : lo + limit]
        left = sum(map(len, chunk))
        while left:
            left -= os.writev(fd, chunk)
            if left:  # a short write: the rest of the chunk, from where it stopped
                chunk = [b"".join(chunk)[-left:]]
