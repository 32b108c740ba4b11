"""Route knowledge flows down: each face declares what admission decides from the head and
which routes are probes; the plumbing below (asgi/) knows no URL. These checks keep the
declarations and the routers in step, so a new inference route cannot be left unadmitted."""

from __future__ import annotations

from pathlib import Path

from resnet_service.asgi.routes import RouteTable, model_from_query
from resnet_service.config import Settings
from resnet_service.faces.http import classify, operations
from resnet_service.faces.oip import rest
from resnet_service.server.app import create_app

ROOT = Path(__file__).resolve().parents[2]
APP = create_app(Settings.model_construct(), exit_on_startup_failure=False)
#: The table the app put together and handed down (a face left out of it shows here).
TABLE: RouteTable = APP.state.head_admission.gate.routes


def _paths(method: str) -> set[str]:
    """The app's routes of one method, as its OpenAPI document lists them (every face's)."""
    return {path for path, ops in APP.openapi()["paths"].items() if method.lower() in ops}


def _scope(path: str, method: str = "POST", query: bytes = b"") -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "query_string": query, "headers": []}


def test_every_route_that_takes_images_is_admitted_from_the_head() -> None:
    """Every POST route of the faces that takes images (all but the repository's control)
    is declared, and every declaration names a route the routers have."""
    posts = _paths("POST")
    takes_images = {p for p in posts if not p.startswith(rest.PREFIX + "/repository")}
    admitted = {p for p in takes_images if TABLE.admitted_route(_scope(p)) is not None}
    assert len(takes_images) == 7  # the JSON API's five, OIP's infer with and without version
    assert admitted == takes_images
    assert {r.template for r in TABLE.admitted} <= posts
    assert set(operations.PROBES) <= _paths("GET")


def test_a_request_names_its_model_where_its_face_says() -> None:
    versioned = _scope("/v2/models/shapes/versions/2/infer")
    route = TABLE.admitted_route(versioned)
    assert route is not None
    assert route.template == "/v2/models/{model_name}/infer"  # one label with or without
    assert route.names_model(versioned) == ("shapes", "2")
    json_api = _scope("/classify", query=b"model=shapes&version=3&top_k=1")
    assert TABLE.admitted_route(json_api) == classify.ADMITTED[0]
    assert model_from_query(json_api) == ("shapes", "3")
    assert TABLE.admitted_route(_scope("/classify", method="GET")) is None
    assert TABLE.single_image == {"/classify", "/embed", "/explain"}


def test_no_url_below_the_faces() -> None:
    """The issue's bar: no route string in asgi/, service/, core/, model/ or runtimes/."""
    below = ["asgi", "service", "core", "model", "runtimes"]
    found = [
        f"{path.relative_to(ROOT)}: {needle}"
        for folder in below
        for path in (ROOT / "src/resnet_service" / folder).rglob("*.py")
        for needle in ('"/classify', '"/embed', '"/explain', '"/v2', "/v2/")
        if needle in path.read_text()
    ]
    assert not found
