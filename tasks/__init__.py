"""Celery step tasks. Importing this package registers them."""
from . import media  # noqa: F401
from . import balance  # noqa: F401
from . import chat  # noqa: F401
