"""Shared fixtures: weights the tests make, a loaded int8 model, settings in temp dirs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from resnet_service.config import Settings
from tests.harness import make_settings

if TYPE_CHECKING:
    from resnet_service.core.runtime import ServedModel

#: Markers by tier, from the folder a test lives in (never by hand): ``make test-fast`` leaves
#: out what starts processes or drives a browser.
_TIER_MARKERS: dict[str, tuple[str, ...]] = {"process": ("slow",), "browser": ("slow", "browser")}
_TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.resolve().relative_to(_TESTS).parts[0]
        for marker in _TIER_MARKERS.get(tier, ()):
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _isolated_torch_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets an empty torch hub cache unless it fills one: nothing leaks from ~."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    for name in list(os.environ):
        if name.startswith("RESNET_SERVICE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded test weights saved as a plain state_dict file."""
    from tests.weights import write_weights

    return write_weights(tmp_path_factory.mktemp("weights") / "resnet18-test.pth")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="session")
def int8_model(weights_file: Path, model_cache: Path) -> ServedModel:
    """The int8 model built from the test weights through the production loader."""
    from resnet_service.model.torch_network import load_model

    return load_model(make_settings(weights_file, model_cache))


@pytest.fixture(scope="session")
def fp32_loaded(weights_file: Path, model_cache: Path) -> ServedModel:
    from resnet_service.model.torch_network import load_model

    return load_model(make_settings(weights_file, model_cache, precision="fp32"))


@pytest.fixture
def settings(weights_file: Path, model_cache: Path) -> Settings:
    return make_settings(weights_file, model_cache)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    """Two cores, shared with servers the tests start: keep the test process to one thread
    (where a collected test uses torch; tests without it never import it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
