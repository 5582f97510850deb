"""Flower's metrics stay on Flower's own /metrics page. `orchestrator dev` gives its children one
PROMETHEUS_MULTIPROC_DIR, which the API's /metrics gathers: once Flower saw task events it wrote
its series there, and the product's /metrics listed every flower_* series as its own."""
from __future__ import annotations

import requests

from conftest import Process, wait_for
from orchestrator.entrypoints.ports import free_port

LOGIN = ("flower", "flower-pass-7c1d")


def test_flower_writes_nothing_to_the_shared_metrics_directory(env, worker, client, tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    port = free_port()
    proc = Process("flower-metrics", ["flower", "--port", str(port)],
                   {**env, "FLOWER_BASIC_AUTH": ":".join(LOGIN), "PROMETHEUS_MULTIPROC_DIR": str(shared)}).start()
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return requests.get(f"{base}/healthcheck", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=60, interval=0.3, what="flower")
        instance = client.post("/saga", json={"type": "trio", "input": {}}).json["id"]
        wait_for(lambda: client.get(f"/sagas/{instance}").json["state"] == "done", timeout=60, what="trio")
        wait_for(lambda: "flower_events_total{" in requests.get(f"{base}/metrics", auth=LOGIN, timeout=10).text,
                 timeout=30, interval=0.5, what="flower to count the task events")
    finally:
        proc.stop()
    assert sorted(p.name for p in shared.iterdir()) == []
