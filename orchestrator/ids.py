"""Random ids (UUID version 4) without a system call each.

`uuid.uuid4()` asks the kernel for 16 bytes every time, and `os.urandom` lets go of the GIL to do
so: in the Kafka bridge, which fills a batch while the batch before commits in another thread,
each of the three ids an event takes became a hand-over of the GIL to that thread and a wait to
get it back (about half the time a batch took to fill). Here the bytes come from the kernel
256 ids at a time; the ids are as random (the same source), and a forked child starts afresh so
that it never repeats its parent's."""
from __future__ import annotations

import os
import threading
import uuid as _uuid

_IDS_PER_READ = 256
_lock = threading.Lock()
_buffer = b""
_used = 0


def uuid4() -> _uuid.UUID:
    """A random UUID (version 4), like `uuid.uuid4()`."""
    global _buffer, _used
    with _lock:
        if _used >= len(_buffer):
            _buffer, _used = os.urandom(16 * _IDS_PER_READ), 0
        raw = _buffer[_used:_used + 16]
        _used += 16
    return _uuid.UUID(bytes=raw, version=4)


def _forget() -> None:
    global _buffer, _used, _lock
    _buffer, _used, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget)
