"""The lock journal: what each lock held by name now is, appended to a file with one ``write`` per change and
folded into the store's ``locks`` table within a second (spec/decisions.md, "Durability").

Why a second file: a lock cycle held by name was two SQLite commits, about 25 µs of its 85 µs round trip (each
commit writes a 4 KiB page and its checksum to the WAL and takes and drops six fcntl locks). An append costs
about 1 µs, and is as durable against the daemon's death (SIGKILL) as a commit under ``synchronous=NORMAL``:
once the call returns, both are in the OS's page cache, and only the OS going down loses either.

A record is ``[seq, name, row]``: lock ``name`` is now ``row`` (owner, token, pid, acquired_at, expires_at,
metadata as JSON), or free when ``row`` is None. The file starts with a header naming the store it belongs to
(``lock_fence.journal_id``), so a journal left beside a deleted store is never replayed into a new one. The
store keeps the seq of the last record folded (``lock_fence.journal_seq``): replay applies only later ones,
so a journal that could not be emptied after its fold replays nothing twice.

Frames: ``<u32 length><u32 crc32>`` and a msgpack body. A last frame cut short (the daemon killed in the middle
of a write, a full disk) fails its length or checksum, and replay stops there: it was never acknowledged. So
does a tail of zeros (an OS crash can leave a file longer than what reached the disk), which would pass both
checks as a frame of length 0, and any body that is not a record. An append that fails is cut off again; while
the journal cannot be cut back, nothing is appended to it.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from typing import Any

import msgpack

from portdaddy.errors import StoreError

log = logging.getLogger("portdaddy.locks")

_FRAME = struct.Struct("<II")  # body length, crc32 of the body
_pack = msgpack.Packer(use_bin_type=True).pack  # one Packer: packb builds one per call, ~0.5 µs of an append
_MAGIC = "port-daddy lock journal 1"
# How often an append looks whether its file is still the journal's (a stat: a deleted journal would take
# appends that no replay could ever read).
CHECK_S = 0.5

Record = tuple[int, str, "list[Any] | None"]


def journal_path(store_path: str) -> str:
    return f"{store_path}-locks"


def _frame(body: list[Any]) -> bytes:
    packed = _pack(body)
    return _FRAME.pack(len(packed), zlib.crc32(packed)) + packed


def replay(path: str, store_id: str, after: int) -> list[Record]:
    """The records past seq ``after`` of the journal at ``path`` if it belongs to store ``store_id``, in order,
    up to the first frame cut short."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreError("STORE_FAILED", f"cannot read the lock journal {path} ({e.strerror}); make it readable by "
                         "the daemon's user, or delete it (locks held by name since the last second before the daemon "
                         "stopped are then forgotten), then start again") from e  # fmt: skip
    records: list[Record] = []
    pos = 0
    header = True
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size : pos + _FRAME.size + length]
        # No body is empty: a frame of length 0 is zeros (CRC-32 of no bytes is 0), a tail an OS crash left.
        record = _decode(body) if 0 < length == len(body) and zlib.crc32(body) == crc else None
        if record is None or not (_is_header(record) if header else _is_record(record)):
            break
        pos += _FRAME.size + length
        if header:
            if record[1] != store_id:
                log.warning("the lock journal %s belongs to another store; ignored", path)
                return []
            header = False
        elif record[0] > after:
            records.append((record[0], record[1], record[2]))
    if pos < len(data):
        log.warning("the lock journal %s ends with %d bytes cut short (the daemon stopped while writing them, "
                    "which were never acknowledged, or the system crashed before they reached the disk); ignored",
                    path, len(data) - pos)  # fmt: skip
    return records


def _decode(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def _is_header(record: Any) -> bool:
    return isinstance(record, list) and len(record) == 2 and record[0] == _MAGIC and isinstance(record[1], str)


def _is_record(record: Any) -> bool:
    return (isinstance(record, list) and len(record) == 3 and type(record[0]) is int and isinstance(record[1], str)
            and (record[2] is None or (isinstance(record[2], list) and len(record[2]) == 6)))  # fmt: skip


class LockJournal:
    """The open journal file. ``append`` never raises: False means the record is not in the journal and the
    change must be written to the store instead."""

    def __init__(self, path: str, fd: int, header: int) -> None:
        self.path = path
        self._fd = fd
        self._header = header  # bytes of the header frame
        self._size = header  # bytes of whole frames
        self._id = _file_id(os.fstat(fd))
        self._checked = time.monotonic()
        self._cut = False  # an append failed and could not be cut off: nothing more goes after it
        # Its file was found deleted or replaced: nothing more goes into it, even if the change that found it out
        # was refused by the store too (the fold that starts a new journal comes later).
        self._lost = False

    @classmethod
    def start(cls, path: str, store_id: str) -> LockJournal | None:
        """A new, empty journal at ``path`` (what was there is folded already); None if it cannot be written."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("no lock journal at %s (%s): locks held by name are written to the store, a commit each",
                        path, e.strerror)  # fmt: skip
            return None
        header = _frame([_MAGIC, store_id])
        try:
            os.ftruncate(fd, 0)
            if os.write(fd, header) == len(header):
                return cls(path, fd, len(header))
        except OSError as e:
            log.warning("cannot start the lock journal %s (%s): locks held by name are written to the store, a "
                        "commit each", path, e.strerror)  # fmt: skip
        os.close(fd)
        return None

    def append(self, seq: int, name: str, row: list[Any] | None) -> bool:
        if self._cut or self._lost:
            return False
        now = time.monotonic()
        if now - self._checked >= CHECK_S:
            self._checked = now
            if not self._ours():
                self._lost = True
                return False
        frame = _frame([seq, name, row])
        try:
            written = os.write(self._fd, frame)
        except OSError:
            written = 0
        if written == len(frame):
            self._size += written
            return True
        self._truncate(self._size)  # a full disk: what part of it got in must not lie in front of the next
        return False

    def empty(self) -> bool:
        """After a fold, drop the records (the store has them). False if this file is not the journal's any more
        (deleted, replaced) or cannot be emptied: start a new one."""
        if self._lost or not self._ours():
            self._lost = True
            return False
        self._truncate(self._header)
        return not self._cut

    def close(self) -> None:
        os.close(self._fd)

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self._cut = True
        else:
            self._size = size
            self._cut = False

    def _ours(self) -> bool:
        try:
            return _file_id(os.stat(self.path)) == self._id
        except OSError:
            return False


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
