"""The fault-injection run (`python -m bench.chaos`, `make chaos`): see harness.py and
docs/reliability.md."""
