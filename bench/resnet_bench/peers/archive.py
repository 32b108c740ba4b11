"""TorchServe's model archive: the model file, the state_dict and the label map the stock
``image_classifier`` handler reads, packed into a ``.mar`` by torch-model-archiver."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from resnet_service.model.weights import StateDict

MODEL_NAME: Final = "resnet18"


#: The archive's model file. TorchServe's eager path imports it and builds the one class it
#: defines with no arguments, then loads the serialized state_dict into it.
MODEL_PY: Final = '''"""torchvision's ResNet18, built with no arguments as TorchServe's eager loader needs."""

from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


@dataclass(frozen=True)
class ArchiveInputs:
    """The files torch-model-archiver packs with the stock handler."""

    model_file: Path
    serialized_file: Path
    labels_file: Path


def index_to_name(labels: Sequence[str]) -> dict[str, str]:
    """The class-index -> label mapping the stock handler reads from ``index_to_name.json``."""
    return {str(i): label for i, label in enumerate(labels)}


def write_archive_inputs(
    state_dict: StateDict, labels: Sequence[str], directory: Path
) -> ArchiveInputs:
    """model.py, the state_dict and the label map, written where the archiver reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    inputs = ArchiveInputs(
        model_file=directory / "model.py",
        serialized_file=directory / f"{MODEL_NAME}.pt",
        labels_file=directory / "index_to_name.json",
    )
    inputs.model_file.write_text(MODEL_PY)
    torch.save(state_dict, inputs.serialized_file)
    inputs.labels_file.write_text(json.dumps(index_to_name(labels)))
    return inputs


def archive_model(bin_dir: Path, inputs: ArchiveInputs, store: Path) -> str:
    """Pack a ``.mar`` with the stock ``image_classifier`` handler; its file name in ``store``."""
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            "--model-name",
            MODEL_NAME,
            "--version",
            "1.0",
            "--model-file",
            str(inputs.model_file),
            "--serialized-file",
            str(inputs.serialized_file),
            "--handler",
            "image_classifier",
            "--extra-files",
            str(inputs.labels_file),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
        timeout=300,
    )
    return f"{MODEL_NAME}.mar"
