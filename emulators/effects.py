"""A ledger of the external effects the emulators perform, for the fault-injection run
(bench/chaos): one JSON line per effect, `{"kind", "key", "effect"}`, appended to the file named
by `EMULATOR_EFFECTS_FILE` (nothing is written when it is unset).

`key` names the unit of work that must happen once (a media stage of one workflow, a commit's
`Orchestrator-Step` marker, a calculation's correlationId, a story's TTS attempt, a worker's
deployment, a chat task's answer); `effect` identifies what was done (the job created, the commit
made, the message handled). A key with more than one distinct effect is a duplicated effect.
Each line is one `write` on a file opened with O_APPEND, so processes and threads may share it.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

#: the effect kinds, as the fault-injection table names them
KINDS = ("media_submit", "gitlab_commit", "gitlab_merge_request", "calculation", "tts_request", "deploy_order",
         "chat_answer")


def record(kind: str, key: str, effect: str) -> None:
    """Append one effect to the ledger (a no-op without EMULATOR_EFFECTS_FILE)."""
    path = os.environ.get("EMULATOR_EFFECTS_FILE")
    if not path:
        return
    line = (json.dumps({"kind": kind, "key": key, "effect": effect}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def summary(path: str) -> dict[str, dict[str, Any]]:
    """Per kind: `effects` (lines), `keys` (distinct keys), `duplicated` (keys with more than one
    distinct effect) and `examples` (up to 5 of those keys with their effects)."""
    seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    lines: dict[str, int] = defaultdict(int)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for raw in f:
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue  # a line cut by a killed writer
                seen[e["kind"]][e["key"]].add(e["effect"])
                lines[e["kind"]] += 1
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        keys = seen.get(kind, {})
        dups = {k: sorted(v) for k, v in keys.items() if len(v) > 1}
        out[kind] = {"effects": lines.get(kind, 0), "keys": len(keys), "duplicated": len(dups),
                     "examples": dict(list(dups.items())[:5])}
    return out
