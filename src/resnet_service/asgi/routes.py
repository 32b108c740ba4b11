"""What a face tells the plumbing below it about its routes, so that no URL is written below
the faces: which requests admission decides from their head (and where such a request names
its model, and how its refusal is written), and which routes are probes. The faces declare
them beside their routes; ``server/app.py`` puts them in one ``RouteTable`` and hands it down.

Metric labels come from bounded sets only: a route's template (or "unmatched") and a known
HTTP method (or "other").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs

from starlette.types import Scope

from resnet_service.asgi.problems import PROBLEM_SHAPE, ErrorShape

#: The model and version a request names; (None, None) for the default model.
ModelRef = tuple[str | None, str | None]
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """A bounded label: made-up methods must not create a time series each."""
    return method if method in _METHODS else "other"


def model_from_query(scope: Scope) -> ModelRef:
    """``?model=NAME&version=V``: how the JSON API's routes name a model."""
    query: bytes = scope.get("query_string", b"")
    if b"model" not in query and b"version" not in query:
        return None, None  # the common case: no parsing
    params = parse_qs(query.decode("latin-1"))
    model, version = params.get("model", [None])[-1], params.get("version", [None])[-1]
    return model or None, version or None


@dataclass(frozen=True, slots=True)
class AdmittedRoute:
    """A POST route whose requests admission decides from the head."""

    template: str  # the route's template, as the router names it (a metric label)
    names_model: Callable[[Scope], ModelRef] = model_from_query
    shape: ErrorShape = PROBLEM_SHAPE  # how the face writes a refusal
    single_image: bool = False  # a refused or failed request is one image
    pattern: re.Pattern[str] | None = None  # paths with parameters; else the template itself


@dataclass(frozen=True)
class RouteTable:
    """Every face's declarations, looked up once a request (a dict, then the few patterns)."""

    admitted: tuple[AdmittedRoute, ...] = ()
    probes: frozenset[str] = frozenset()  # a 503 from a probe is an answer, not a rejection
    _exact: dict[str, AdmittedRoute] = field(init=False, repr=False)
    _patterns: tuple[AdmittedRoute, ...] = field(init=False, repr=False)
    single_image: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        exact = {r.template: r for r in self.admitted if r.pattern is None}
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_patterns", tuple(r for r in self.admitted if r.pattern))
        single = frozenset(r.template for r in self.admitted if r.single_image)
        object.__setattr__(self, "single_image", single)

    @classmethod
    def of(cls, *declared: Iterable[AdmittedRoute], probes: Iterable[str] = ()) -> RouteTable:
        return cls(tuple(r for routes in declared for r in routes), frozenset(probes))

    def admitted_route(self, scope: Scope) -> AdmittedRoute | None:
        """The route of an inference request subject to admission, else None."""
        if scope["method"] != "POST":
            return None
        path: str = scope["path"]
        route = self._exact.get(path)
        if route is not None:
            return route
        for candidate in self._patterns:
            if candidate.pattern is not None and candidate.pattern.match(path):
                return candidate
        return None
