"""Child processes that die with the process that started them (`orchestrator dev`, its bundled
Kafka broker), so a `kill -9` of the parent leaves no server holding its ports.

Each child runs in a session of its own (out of the terminal's Ctrl-C, stopped by its parent in
order), so nothing else would reach it once the parent is gone. On Linux the kernel sends it a
signal when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from typing import Callable

#: linux/prctl.h
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when this process dies. None off
    Linux. SIGTERM for the product's processes (a worker finishes its step, the API its
    requests), SIGKILL for what keeps nothing worth a clean stop (the emulators, the memory-only
    broker).

    The kernel sends the signal when the *thread* that forked the child ends, not the process:
    call Popen from the main thread (or one that lives as long as the process)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("children must be started from the main thread: they die with the thread that forked them")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # the parent may have died between fork and prctl: then no signal would ever come
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec
