"""The demo project `demo/balance` that `orchestrator dev` creates for a newcomer."""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.repository import GitRepo

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
