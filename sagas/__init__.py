"""Built-in workflows. Importing this package registers them with the engine."""
from . import media  # noqa: F401
from . import chat  # noqa: F401
