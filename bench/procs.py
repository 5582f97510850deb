"""Processes, their memory and CPU (psutil), and waiting: the benchmark's plumbing."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """Stops the run with a message; resources are cleaned up first."""


def note(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Process:
    """A process started in a session (process group) of its own, its output in `logdir/name.log`.
    `argv` defaults to the orchestrator CLI with `args`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path,
                 argv: list[str] | None = None, pipes: bool = False) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        cmd = argv or [sys.executable, "-m", "orchestrator.entrypoints.cli", *args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stderr=out, start_new_session=True,
                stdout=subprocess.PIPE if pipes else out, stdin=subprocess.PIPE if pipes else None,
                text=pipes or None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def descendants(root: int) -> list[int]:
    """root and all its descendants (psutil); [root] once it is gone."""
    try:
        return [root] + [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return [root]


def pss_kib(pid: int) -> int:
    """Proportional set size: each page shared by n processes counted 1/n in each (KiB; 0 if gone)."""
    try:
        return int(psutil.Process(pid).memory_full_info().pss) // 1024
    except psutil.Error:
        return 0


def rss_kib(pid: int) -> int:
    """Resident set size (KiB; 0 if gone)."""
    try:
        return int(psutil.Process(pid).memory_info().rss) // 1024
    except psutil.Error:
        return 0


def tree_rss_mib(pid: int) -> float:
    """RSS summed over a process and its descendants, in MiB."""
    return sum(rss_kib(p) for p in descendants(pid)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, in seconds (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


class RssSampler(threading.Thread):
    """Sums RSS over a process tree every `interval` seconds; keeps the maximum (KiB), and the
    maximum of the tree's summed PSS beside it (a forked pool's shared pages counted once)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.peak_pss_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            tree = descendants(self.pid)
            self.peak_kib = max(self.peak_kib, sum(rss_kib(p) for p in tree))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(pss_kib(p) for p in tree))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float, what: str,
             check: Callable[[], None] | None = None) -> Any:
    """Poll `predicate` until truthy (its value) or raise BenchError after `timeout` seconds;
    `check` runs between polls (e.g. to fail fast when a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
