"""The layout holds: imports only point down, no face imports another, nothing below the faces
speaks a transport (``lint-imports``, contracts in pyproject.toml), and no module of the
package takes part in an import circle (grimp's graph, ``TYPE_CHECKING`` imports included)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Final

import grimp
import pytest

from resnet_service.asgi.problems import HTTP_STATUS, error_problem
from resnet_service.core import errors
from resnet_service.faces.http.schemas import Problem
from resnet_service.faces.oip.errors import GRPC_STATUS

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                imported = graph.find_modules_directly_imported_by(child) & modules
                work.append((child, iter(sorted(imported))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circles() -> None:
    graph = grimp.build_graph("resnet_service", exclude_type_checking_imports=False)
    modules = {m for m in graph.modules if m.startswith("resnet_service")}
    # Only module-to-module edges: a package's __init__ is a module like any other here.
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph, {"p.a", "p.b", "p.c"}) == [["p.a", "p.b"]]


@pytest.mark.parametrize("error", errors.error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_code_has_a_status_in_every_face(error: type[errors.ServiceError]) -> None:
    assert error.code in HTTP_STATUS, f"{error.__name__}: no HTTP status for {error.code!r}"
    assert error.code in GRPC_STATUS, f"{error.__name__}: no gRPC status for {error.code!r}"
    status = HTTP_STATUS[error.code]
    body = error_problem(error("detail"), "/classify", "rid")
    problem = Problem.model_validate_json(body)
    assert (problem.status, problem.code, problem.title) == (status, error.code, error.title)


#: Generated gRPC messages share the protobuf package with tritonclient's: never imported here.
_NOT_IMPORTED: Final = ("resnet_service.faces.oip.pb", "resnet_service.faces.oip.grpc")


def test_every_domain_error_is_declared_in_core_errors() -> None:
    """Import every module of the package; every ServiceError subclass then lives in one place."""
    import resnet_service

    for module in pkgutil.walk_packages(resnet_service.__path__, "resnet_service."):
        if not module.name.startswith(_NOT_IMPORTED) and module.name != "resnet_service.__main__":
            importlib.import_module(module.name)
    outside = [
        f"{cls.__module__}.{cls.__name__}"
        for cls in errors.error_classes()
        if cls.__module__ != errors.__name__
    ]
    assert outside == []


def test_error_codes_are_unique_per_class() -> None:
    codes = [cls.code for cls in errors.error_classes() if cls is not errors.RetryLater]
    assert len(codes) == len(set(codes))


def test_the_core_takes_what_it_uses_not_the_settings() -> None:
    """The core reads its options (``ClassifierOptions``, built in ``service/loading.py``),
    never the whole ``Settings``: only the runtime and precision names come from config."""
    import ast

    for path in (ROOT / "src/resnet_service/core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "resnet_service.config":
                names = {alias.name for alias in node.names}
                assert names <= {"Precision", "RuntimeName"}, (path.name, names)
