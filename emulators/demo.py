"""The demo project `demo/balance` that `orchestrator dev` creates for a newcomer.

`python -m emulators.demo --repos-dir DIR` creates it unless it exists (the dev runner runs this).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sagas.balance.repository import GitRepo

DEMO_PROJECT = "demo/balance"


def demo_files() -> dict[str, str]:
    balance = {
        "plant": "demo",
        "condenser": {"pressure_kpa": 7.5, "cooling_water_flow_kg_s": 1200, "inlet_temperature_c": 18},
        "evaporator": {"pressure_kpa": 350, "mass_flow_kg_s": 42, "superheat_k": 5},
        "compressor": {"efficiency": 0.82, "pressure_ratio": 3.4, "speed_rpm": 2950},
    }
    manifest = {"geometries": [
        {"id": "condenser-shell-v2", "name": "Condenser shell, rev. 2", "file": "geometry/condenser_shell.step"},
        {"id": "evaporator-tubes", "name": "Evaporator tube bundle", "file": "geometry/evaporator_tubes.step"},
    ]}
    return {"balance_input.json": json.dumps(balance, indent=2) + "\n",
            "geometries_manifest.json": json.dumps(manifest, indent=2) + "\n",
            "README.md": "# demo/balance\n\nInputs of the balance calculation saga.\n"}


def ensure_local_demo(repos_dir: str | Path) -> Path | None:
    """Create `<repos_dir>/demo/balance` (a bare git repository) unless it exists; its path if created."""
    path = Path(repos_dir) / DEMO_PROJECT
    if path.exists() or Path(f"{path}.git").exists():
        return None
    GitRepo.init(path).commit("main", demo_files(), "Demo project for the balance saga\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emulators.demo", description="create the demo project if missing")
    p.add_argument("--repos-dir", default="./data/repos", help="the local git backend's folder (GIT_REPOS_DIR)")
    args = p.parse_args(argv)
    if ensure_local_demo(args.repos_dir):
        print(f"created the demo project {DEMO_PROJECT} in {args.repos_dir}", flush=True)


if __name__ == "__main__":
    main()
