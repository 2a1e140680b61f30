"""The durable spool: the intake plane between the HTTP workers and the single loader.

DuckDB allows one writing process per file, so HTTP workers never touch the warehouse. Each
worker process appends to its *own* segment file in a shared folder, so no two processes
ever write one file and no cross-process lock sits on the hot path. A record is::

    length (u32 LE) | crc32 of body (u32 LE) | body

and the body is one request's worth of intake: a JSON header line (source, failures) and one
line per accepted message (compact JSON). A request is acknowledged only after its record is
fsynced. Concurrent requests of one worker share an fsync (group commit): the first waiter
starts an fsync covering everything written so far, later writers wait for the next one.

The writer holds an exclusive ``flock`` on its open segment. The loader reads records as
they appear and takes a segment to be *finished* once it can take that lock itself — the
writer rotated to a new segment or died (the kernel drops a dead process's locks). Only then
is a torn or checksum-failing tail final: a record cut short by a crash was never
acknowledged (its fsync never returned), so skipping it loses nothing a client was promised.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<II")
SEGMENT_SUFFIX = ".seg"
OFFSETS_FILE = "offsets.json"
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a length above this is corruption, not a record


class SpoolUnavailable(Exception):
    """The spool could not make a record durable (disk full, I/O error): answer 503."""


def encode_record(header: dict[str, Any], lines: list[bytes]) -> bytes:
    """One record: the framed body of a header line and the message lines."""
    body = b"\n".join([json.dumps(header, separators=(",", ":")).encode(), *lines])
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_body(body: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The header and message lines of a record body."""
    first, _, rest = body.partition(b"\n")
    header: dict[str, Any] = json.loads(first)
    return header, rest.split(b"\n") if rest else []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """The segment files of one worker process, appended to from its event loop.

    ``append`` is called from a single asyncio loop, so writes never interleave; the fsync
    runs in a thread so the loop keeps accepting requests while the disk works.
    """

    def __init__(self, folder: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._fd = -1
        self._size = 0
        self._written = 0  # records written to the current file (sequence numbers)
        self._synced = 0
        self._syncing = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._broken: BaseException | None = None
        self._open()

    def _create(self) -> tuple[int, Path]:
        """A new segment, locked and named; touches no state (runs in a thread)."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
        path = self.folder / name
        # Created and locked under a name the loader ignores, then renamed: a segment the
        # loader can see is always locked while its writer lives. (Locked after creation
        # under its final name, the loader could find it empty and unlocked, take it for
        # finished and delete it just before the writer locked it and wrote to it.)
        hidden = path.with_name(name + ".new")
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, path)
            _fsync_dir(self.folder)  # the new name itself must survive a crash
        except OSError:
            os.close(fd)
            raise
        return fd, path

    def _open(self) -> None:
        self._fd, self.path = self._create()
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)  # releases the lock: the loader may finish this segment
            self._fd = -1

    async def append(self, record: bytes) -> None:
        """Write one record and return once it is on disk; raise SpoolUnavailable if not."""
        if self._broken is not None:
            self._reopen()
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(f"short write ({written} of {len(record)} bytes)")
        except OSError as e:
            self._broken = e
            raise SpoolUnavailable(f"spool write failed: {e}") from None
        self._size += len(record)
        self._written += 1
        seq = self._written
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        if not self._syncing:
            self._syncing = True
            asyncio.get_running_loop().create_task(self._sync_loop())
        await fut

    def _reopen(self) -> None:
        """After a failed write or fsync the file's state is unknown: start a new segment."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        self._written = self._synced = 0
        try:
            self._open()
        except OSError as e:
            raise SpoolUnavailable(f"spool cannot open a segment: {e}") from None
        self._broken = None

    async def _sync_loop(self) -> None:
        try:
            while self._synced < self._written:
                rotate = self._size >= self.segment_bytes
                if rotate:
                    # The next segment is made off the event loop (its folder fsync can take
                    # a while); requests keep writing to the current one meanwhile.
                    try:
                        new_fd, new_path = await asyncio.to_thread(self._create)
                    except OSError:
                        rotate = False  # keep appending here; a later pass tries again
                target, fd = self._written, self._fd
                if rotate:
                    self._fd, self.path, self._size = new_fd, new_path, 0
                try:
                    await asyncio.to_thread(os.fsync, fd)
                except OSError as e:
                    self._broken = e
                    if rotate:  # the old segment is given up: let the loader finish it
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    waiters, self._waiters = self._waiters, []
                    for _, fut in waiters:
                        if not fut.done():
                            fut.set_exception(SpoolUnavailable(f"spool fsync failed: {e}"))
                    return
                if rotate:
                    os.close(fd)  # releases its lock: the loader may now finish it
                self._synced = target
                keep: list[tuple[int, asyncio.Future[None]]] = []
                for seq, fut in self._waiters:
                    if seq <= target:
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        keep.append((seq, fut))
                self._waiters = keep
        finally:
            self._syncing = False


# ---- reading (the loader's side) ----------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One record of a segment and the offset just past it."""

    segment: str
    offset: int
    end: int
    body: bytes


def segment_names(folder: Path) -> list[str]:
    """Segments in the folder, oldest first (names start with their creation time)."""
    return sorted(p.name for p in folder.glob(f"*{SEGMENT_SUFFIX}"))


def writer_gone(path: Path) -> bool:
    """True once no process holds the segment's lock: its writer rotated away or died."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def read_records(path: Path, offset: int, max_bytes: int) -> tuple[list[Record], int, bool]:
    """Whole, checksum-valid records from ``offset``, about ``max_bytes`` of them.

    Returns the records, the offset after the last one, and whether reading stopped at bad
    data (a torn or corrupt record) rather than at the end of what has been written.
    """
    records: list[Record] = []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(max_bytes)
        pos = 0
        while pos + HEADER.size <= len(data):
            length, crc = HEADER.unpack_from(data, pos)
            if length > MAX_RECORD_BYTES:
                return records, offset + pos, True
            start, end = pos + HEADER.size, pos + HEADER.size + length
            if end > len(data):
                if records:  # the rest comes in the next call
                    break
                f.seek(offset + start)  # one record bigger than max_bytes: read it whole
                body = f.read(length)
                if len(body) < length:
                    break
                if zlib.crc32(body) != crc:
                    return records, offset + pos, True
                records.append(Record(path.name, offset, offset + start + length, body))
                return records, offset + start + length, False
            body = data[start:end]
            if zlib.crc32(body) != crc:
                return records, offset + pos, True
            records.append(Record(path.name, offset + pos, offset + end, body))
            pos = end
    return records, offset + pos, False


class Offsets:
    """How far the loader has moved each segment into the warehouse, kept in a small file.

    Written atomically (temporary file, fsync, rename, fsync of the folder). Progress may lag
    the warehouse after a crash — the loader then re-reads records it already loaded, and the
    warehouse's messageId dedup drops them — but it never runs ahead of it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / OFFSETS_FILE
        self.positions: dict[str, int] = {}
        if self.path.exists():
            self.positions = {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}

    def get(self, segment: str) -> int:
        return self.positions.get(segment, 0)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self.positions, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        _fsync_dir(self.path.parent)


def backlog_bytes(folder: Path) -> int:
    """Bytes in the spool not yet removed by the loader (a measure of pressure)."""
    total = 0
    for p in folder.glob(f"*{SEGMENT_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def iter_segments(folder: Path) -> Iterator[Path]:
    for name in segment_names(folder):
        yield folder / name
