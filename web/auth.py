"""Who may do what over HTTP.

- Admin operations (`/admin/*`) and the bulk operations (`/sagas/bulk*`) need the ADMIN_TOKEN, sent
  as `X-Admin-Token: <token>` or `Authorization: Bearer <token>`. With no ADMIN_TOKEN configured
  they are off: 403 saying how to enable them. A missing token is a 401 with
  `WWW-Authenticate: Bearer`, a wrong one a 403; both name the header in `field`.
- The operator console (`/ui/`) uses HTTP basic auth against CONSOLE_BASIC_AUTH (web/console.py),
  and Flower its own `--basic-auth` from FLOWER_BASIC_AUTH (`orchestrator flower`).
- `GET /issues` takes the user the API gateway authenticated from `X-User`; without it, 401.

Every 401 is an `orchestrator.errors.Unauthorized`, which cannot be made without its
`WWW-Authenticate` challenge: one of those below, for the credential it asks for.

Tokens and passwords are compared in constant time and never logged or echoed back.
"""
from __future__ import annotations

import hmac

from orchestrator.errors import Forbidden, Unauthorized

from . import admin_token_sent, runtime

#: The header an admin token is sent in (the `field` of a refusal).
ADMIN_HEADER = "X-Admin-Token"
ADMIN_CHALLENGE = 'Bearer realm="orchestrator admin"'
#: The console's login (HTTP basic auth); the header it is sent in.
CONSOLE_CHALLENGE = 'Basic realm="orchestrator console", charset="UTF-8"'
CONSOLE_HEADER = "Authorization"
#: The user an authenticating gateway passes on (`GET /issues`): no standard scheme carries it,
#: so the challenge names the header.
USER_HEADER = "X-User"
USER_CHALLENGE = 'X-User realm="orchestrator"'


def same_secret(given: str, expected: str) -> bool:
    """`given == expected`, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode(), expected.encode())


def require_admin(what: str = "admin operations") -> None:
    """Return if the request carries the ADMIN_TOKEN; otherwise raise: Forbidden when the server
    has none (`what` are disabled), Unauthorized (401, WWW-Authenticate: Bearer) when the request
    sends none, Forbidden when it sends a wrong one. Every refusal has `field: X-Admin-Token`."""
    token = runtime().settings.admin_token
    if not token:
        raise Forbidden(f"{what} are disabled: set ADMIN_TOKEN to enable them", field=ADMIN_HEADER)
    given = admin_token_sent()
    if given is None:
        raise Unauthorized(f"admin token missing (send {ADMIN_HEADER} or Authorization: Bearer)", ADMIN_CHALLENGE,
                           field=ADMIN_HEADER)
    if not same_secret(given, token):
        raise Forbidden("admin token is wrong", field=ADMIN_HEADER)
