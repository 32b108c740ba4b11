"""The uvicorn internals ``server/http.py`` relies on are all where it expects them: an upgrade
that moves one fails here, naming it, instead of in a drain or under overload."""

from __future__ import annotations

import importlib
import inspect

import pytest
import uvicorn

from resnet_service.server.http import UVICORN_INTERNALS, Internal


def _present(internal: Internal) -> bool:
    """A module attribute, a class attribute, or an attribute a class sets in __init__."""
    parts = internal.where.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module("uvicorn." + ".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        last = parts[-1]
        if hasattr(owner, last):
            return True
        init = getattr(owner, "__init__", None)
        return (
            inspect.isclass(owner)
            and init is not None
            and f"self.{last} " in (inspect.getsource(init))
        )
    return False


@pytest.mark.parametrize("internal", UVICORN_INTERNALS, ids=lambda i: i.where)
def test_each_internal_is_where_the_seam_expects_it(internal: Internal) -> None:
    assert _present(internal), f"uvicorn {uvicorn.__version__} moved {internal.where}"
    assert internal.why
    assert internal.public_hook


def test_the_overridden_methods_keep_their_signatures() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    start = inspect.signature(HttpToolsProtocol._start_asgi_task)
    assert list(start.parameters) == ["self", "cycle", "app"]
    assert list(inspect.signature(uvicorn.Server.on_tick).parameters) == ["self", "counter"]
    shutdown = inspect.signature(uvicorn.Server.shutdown)
    assert list(shutdown.parameters) == ["self", "sockets"]


def test_the_seam_sees_a_moved_internal() -> None:
    moved = Internal("server.Server._no_such_thing", "a check of the check", "none")
    assert not _present(moved)
