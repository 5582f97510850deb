from __future__ import annotations

from conftest import wait_for


def test_smoke(client, worker, sweeper):
    r = client.post("/pipeline", json={"youtube_url": "https://www.youtube.com/watch?v=abc123"})
    assert r.status_code == 200, r.json
    job = r.json["job_id"]
    final = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
        client.get(f"/jobs/{job}").json), timeout=30, what="job to finish")
    print(final)
    assert final["status"] == "completed"
