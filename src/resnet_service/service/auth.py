"""The one bearer-token check, for every face (REST headers, gRPC metadata), and whose cached
answers a caller may share."""

from __future__ import annotations

import hashlib
import secrets

from pydantic import SecretStr

from resnet_service.core.errors import ControlOff, Unauthorized


def check_bearer(authorization: str, token: SecretStr | None, how: str) -> None:
    """Accept ``authorization`` (an ``Authorization`` value) when it carries the token, or
    when no token is configured; else ``Unauthorized`` saying ``how`` to send it."""
    if token is None:
        return
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.get_secret_value().encode()
    ):
        raise Unauthorized(f"Send {how} with the service's token.")


def cache_scope(authorization: str, token: SecretStr | None) -> str:
    """With auth on, a caller shares cached answers only with its own token."""
    if token is None:
        return ""
    return hashlib.sha256(authorization.encode()).hexdigest()


def check_admin(authorization: str, token: SecretStr | None, how: str) -> None:
    """The repository control routes: off without an admin token, then its bearer check."""
    if token is None:
        raise ControlOff(
            "Repository control is off: set RESNET_SERVICE_ADMIN_TOKEN to turn it on (and "
            "RESNET_SERVICE_REPOSITORY_CONTROL=explicit to load and unload models)."
        )
    check_bearer(authorization, token, how)
