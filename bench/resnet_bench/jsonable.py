"""The one edge where the harness's typed results become JSON: frozen dataclasses (nested in
dicts, lists and tuples) turned into the plain dicts the reports write, field by field in
declaration order, so that each report keeps its exact shape."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable

_OMIT: Final = "omit_when_none"
#: Field metadata (``field(default=None, metadata=OMITTED_WHEN_NONE)``): the key is left out
#: of the JSON while the value is None (a stage that did not run, a label nobody set), as the
#: reports always did, rather than written as null.
OMITTED_WHEN_NONE: Final = MappingProxyType({_OMIT: True})


@runtime_checkable
class ShapesItsJson(Protocol):
    """A result whose JSON is not one key per field (a flat table of named figures)."""

    def to_json(self) -> dict[str, Any]: ...


def to_json(value: object) -> Any:
    """``value`` as JSON-ready dicts, lists and scalars."""
    if isinstance(value, ShapesItsJson):
        return value.to_json()
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in fields(value)
            if not (f.metadata.get(_OMIT) and getattr(value, f.name) is None)
        }
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    return value
