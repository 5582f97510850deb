"""Celery step tasks. Importing this package registers them."""
from . import media  # noqa: F401
