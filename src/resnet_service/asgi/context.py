"""One typed record of an HTTP request as it crosses the layers: what admission decided, what
the route did, and what the access log, the metrics and the span read when it ends.

It lives in the ASGI scope's ``state`` (Starlette's ``request.state``) under one key, opened by
whichever layer sees the request first: the protocol layer's admission, or the request-context
middleware.
"""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from starlette.requests import Request
from starlette.types import Scope

from resnet_service.core.priority import Priority

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from resnet_service.core.admission import Ticket
    from resnet_service.core.classifier import Classifier
    from resnet_service.core.results import Timings

_KEY: Final = "request_context"
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(slots=True)
class RequestContext:
    request_id: str
    #: The admitted route's template, for a refusal that never reached the router.
    route: str | None = None
    #: An inference request's class (set by admission, or by OIP's ``priority`` parameter).
    priority: Priority | None = None
    #: The version admission chose: the route answers with it.
    classifier: Classifier | None = None
    ticket: Ticket | None = None
    span: Span | None = None
    error_code: str | None = None
    images: int | None = None
    #: Images answered and images failed, as the route counted them (the metrics read these).
    images_ok: int = 0
    images_failed: int = 0
    timings: Timings | None = None
    response_started: bool = False
    #: Refusals this access-log line stands for (they are logged at most once a second).
    refusals_logged_as_one: int | None = None


class RequestIds:
    """New request ids: a random per-process prefix and a counter (unique, and without a
    urandom system call per request as ``uuid4`` costs)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


def request_id_from(scope: Scope, ids: RequestIds) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return ids.new()


def open_context(scope: Scope, ids: RequestIds) -> RequestContext:
    """The request's context, made (with its id) if no layer above made it."""
    state = scope.setdefault("state", {})
    context: RequestContext | None = state.get(_KEY)
    if context is None:
        context = state[_KEY] = RequestContext(request_id_from(scope, ids))
    return context


def request_context(request: Request) -> RequestContext:
    """The context of a request the middleware wraps: what a face's route writes to."""
    context: RequestContext = request.scope["state"][_KEY]
    return context
