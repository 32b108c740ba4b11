"""OpenAPI details FastAPI cannot derive: problem+json error responses, multipart bodies, and
the limits that come from the settings (``top_k`` maximum, batch size)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from fastapi import FastAPI
from pydantic import BaseModel

from resnet_service.asgi.problems import PROBLEM_JSON
from resnet_service.config import Settings
from resnet_service.faces.http.schemas import Problem

_PROBLEM_DESCRIPTIONS: Final = {
    400: "Malformed request (not multipart, broken multipart, empty upload).",
    401: "Missing or wrong bearer token.",
    404: "No such model or version (GET /models lists them).",
    408: "The client stalled while sending the request.",
    409: "This model cannot give that output (built by an older version: rebuild it).",
    413: "Upload too large: bytes, or pixels from the image header.",
    415: "Not an allowed image format, or undecodable.",
    422: "Invalid parameter or missing field.",
    503: "Overloaded or not ready; see Retry-After.",
    504: "The request's deadline passed while it waited for the model.",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses, all RFC 9457 problem+json (schema ``Problem``)."""
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        code: {"description": _PROBLEM_DESCRIPTIONS[code], "content": {PROBLEM_JSON: ref}}
        for code in codes
    }


def multipart_body(field: str, many: bool) -> dict[str, Any]:
    """The request body of an upload route (the route reads it itself, streaming)."""
    item = {"type": "string", "format": "binary"}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1} if many else item
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [field], "properties": {field: schema}}
                }
            },
        }
    }


def _apply_limits(spec: dict[str, Any], settings: Settings) -> None:
    """Put this deployment's limits into the spec: ``top_k`` maximum, batch ``maxItems``."""
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            for param in operation.get("parameters", ()):
                if param.get("name") == "top_k":
                    param["schema"]["maximum"] = settings.max_top_k
            content = operation.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data", {}).get("schema", {})
            images = form.get("properties", {}).get("images")
            if images is not None:
                images["maxItems"] = settings.max_batch_files


def install(app: FastAPI, settings: Settings, schemas: Sequence[type[BaseModel]] = ()) -> None:
    """Wrap ``app.openapi`` so the spec carries the ``Problem`` schema, other faces' request
    ``schemas`` (bodies their routes read themselves) and the limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            models: list[type[BaseModel]] = [Problem, *schemas]
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            _apply_limits(spec, settings)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
