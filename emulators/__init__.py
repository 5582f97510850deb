"""Local stand-ins for the external HTTP services the orchestrator calls."""
