"""Flower's metrics stay on Flower's own /metrics page. `orchestrator dev` gives its children one
PROMETHEUS_MULTIPROC_DIR, which the API's /metrics gathers: once Flower saw task events it wrote
its series there, and the product's /metrics listed every flower_* series as its own."""
from __future__ import annotations

import requests

from conftest import start_flower, wait_for

LOGIN = ("flower", "flower-pass-7c1d")


def test_flower_writes_nothing_to_the_shared_metrics_directory(env, worker, client, tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    proc, base = start_flower("flower-metrics", {**env, "FLOWER_BASIC_AUTH": ":".join(LOGIN),
                                                 "PROMETHEUS_MULTIPROC_DIR": str(shared)})
    try:
        instance = client.post("/saga", json={"type": "trio", "input": {}}).json["id"]
        wait_for(lambda: client.get(f"/sagas/{instance}").json["state"] == "done", timeout=60, what="trio")
        wait_for(lambda: "flower_events_total{" in requests.get(f"{base}/metrics", auth=LOGIN, timeout=10).text,
                 timeout=30, interval=0.5, what="flower to count the task events")
    finally:
        proc.stop()
    assert sorted(p.name for p in shared.iterdir()) == []
