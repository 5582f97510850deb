"""What real processes write with LOG_FORMAT=json: every line, from start-up to a clean stop, is a
JSON object a log pipeline can read (README, "Logs")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

KEYS = {"ts", "level", "logger", "process", "message"}


def not_json_objects(text: str) -> list[str]:
    """The lines of `text` that are not a JSON object with every key of a log line (KEYS)."""
    bad = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(record, dict) or not KEYS <= record.keys():
            bad.append(line)
    return bad


def test_warnings_and_uncaught_errors_are_json_lines_too(tmp_path):
    script = ("import logging, threading, warnings\n"
              "from orchestrator.logs import configure\n"
              "configure('INFO', 'json')\n"
              "warnings.warn('careful', UserWarning)\n"
              "t = threading.Thread(target=lambda: 1 / 0, name='helper'); t.start(); t.join()\n"
              "raise RuntimeError('boom')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert out.stdout == "" and not_json_objects(out.stderr) == [], out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("WARNING", "py.warnings"), ("ERROR", "orchestrator"), ("CRITICAL", "orchestrator")], lines
    assert "UserWarning: careful" in lines[0]["message"]
    assert "helper" in lines[1]["message"] and "ZeroDivisionError" in lines[1]["exc"]
    assert lines[2]["message"] == "uncaught RuntimeError: boom" and "Traceback" in lines[2]["exc"]
