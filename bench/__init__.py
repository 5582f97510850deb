"""Benchmarks of the engine against plain Celery on the real services (`python -m bench.run`)."""
