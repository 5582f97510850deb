"""A consumer of the calculation queues (the calculator emulator, `orchestrator calc-results`)
whose broker refuses it says why in one line per try: kombu's consumer loop logged a whole
traceback at every try, about one a second, for as long as the broker refused (a vhost that
does not exist) or was down."""
from __future__ import annotations

import subprocess
import sys
import threading

from conftest import ROOT


def test_a_refused_broker_is_one_line_per_try_naming_why(env):
    proc = subprocess.Popen([sys.executable, "-m", "emulators.calculator"], cwd=ROOT, text=True,
                            env={**env, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//no-such-vhost"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    deadline = threading.Timer(30, proc.kill)  # a process that never says it ends the read here
    deadline.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if sum("NOT_ALLOWED" in seen for seen in lines) >= 2:  # two tries: the loop goes on
                break
    finally:
        deadline.cancel()
        proc.kill()
        proc.wait(timeout=30)
    out = "".join(lines)
    assert "Traceback" not in out, out
    refused = [line for line in lines if "NOT_ALLOWED" in line]
    assert len(refused) == 2 and all("vhost /no-such-vhost not found" in line for line in refused), out
