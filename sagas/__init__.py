"""Built-in workflows. Importing this package registers them with the engine."""
from . import media  # noqa: F401
from . import balance  # noqa: F401
from . import route_content  # noqa: F401
from . import worker_deployment  # noqa: F401
from . import chat  # noqa: F401
