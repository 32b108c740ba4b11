"""The Open Inference Protocol's data plane, transport-free (think MLServer's DataPlane): the
model's metadata and readiness, and inference over the same classifier as ``/classify`` (so
the same limits, queue, admission, deadlines and numbers).

The model takes one input per request:
- ``image``: BYTES, shape ``[N]`` or ``[N, 1]``, each element an encoded image (JPEG, PNG...);
- ``input``: FP32, shape ``[N, 3, H, W]``, images already preprocessed (normalised).
It returns ``probabilities`` (FP32 ``[N, classes]``); asked with the classification extension
(``"classification": k``) that output becomes BYTES ``[N, k]`` of ``"score:index:label"``.
Asked by name, from the same forward: ``embedding`` (FP32 ``[N, D]``, L2-normalised as
``/embed``'s default) and ``cam`` (FP32 ``[N, h, w]``, the class activation map of the output's
or the request's ``target`` parameter, else of each image's top class; as ``/explain``'s grid).
A request fails as a whole when any image fails (the protocol has no per-item errors): the
message names the element.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from resnet_service import __version__
from resnet_service.core import priority
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import InvalidInferRequest, NotReady, ServiceError
from resnet_service.core.feature_outputs import class_activation_map, l2_normalised
from resnet_service.core.results import Classification, top_k
from resnet_service.core.runtime import LOGITS_ONLY, Output, Wants
from resnet_service.faces.oip.tensors import (
    InferRequest,
    InferResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
)
from resnet_service.service.models import VersionState
from resnet_service.service.state import ServiceState

IMAGE_INPUT: Final = "image"
TENSOR_INPUT: Final = "input"
PROBABILITIES: Final = "probabilities"
EMBEDDING: Final = "embedding"
CAM: Final = "cam"
#: BYTES [N]: each image's tags as a JSON array of {name, score, categories, aliases}.
TAGS: Final = "tags"
#: What each output asks the forward for besides the logits.
_WANTS: Final[dict[str, Output]] = {EMBEDDING: Output.EMBEDDING, CAM: Output.FEATURE_MAP}
SERVER_NAME: Final = "resnet-service"
EXTENSIONS: Final = ("classification", "binary_tensor_data")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


class DataPlane:
    """Metadata, readiness and inference for every served model version."""

    def __init__(
        self,
        resolve: Callable[[str | None, str | None], Classifier],
        ready: Callable[[], bool],
        versions: Callable[[str], list[str]],
        draining: Callable[[], bool],
        max_batch_files: int,
    ) -> None:
        self._resolve = resolve
        self._max_batch_files = max_batch_files
        self._ready = ready
        self._versions = versions
        self._draining = draining

    @classmethod
    def over(cls, service: ServiceState) -> DataPlane:
        """The data plane over a worker's service (its model table, readiness, draining)."""

        def ready_versions(name: str) -> list[str]:
            return [
                e.version for e in service.models.versions(name) if e.state is VersionState.READY
            ]

        return cls(
            service.require_classifier,
            lambda: service.readiness_problem() is None,
            ready_versions,
            lambda: service.draining,
            service.settings.max_batch_files,
        )

    # --- metadata and health -------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def server_ready(self) -> bool:
        return self._ready()

    def check_model(self, name: str, version: str | None) -> Classifier:
        """The classifier of ``name`` (its ``version``, or its highest ready one); else
        ``ModelNotFound`` (or ``NotReady`` while it loads)."""
        return self._resolve(name, version or None)

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            return self.check_model(name, version).ready and not self._draining()
        except NotReady:
            return False

    def inputs(self, classifier: Classifier) -> list[TensorSpec]:
        side = classifier.model.spec.crop_size
        return [
            TensorSpec(IMAGE_INPUT, "BYTES", (-1,)),
            TensorSpec(TENSOR_INPUT, "FP32", (-1, 3, side, side)),
        ]

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        classifier = self.check_model(name, version)
        info = classifier.model.info
        return {
            "name": classifier.name,
            "versions": self._versions(classifier.name),
            "platform": f"{info.runtime}_{info.precision}",
            "inputs": [_tensor_metadata(t) for t in self.inputs(classifier)],
            "outputs": [_tensor_metadata(t) for t in self.outputs(classifier)],
        }

    def outputs(self, classifier: Classifier) -> list[TensorSpec]:
        specs = [TensorSpec(PROBABILITIES, "FP32", (-1, classifier.model.info.num_classes))]
        if classifier.embedding_size is not None:
            specs.append(TensorSpec(EMBEDDING, "FP32", (-1, classifier.embedding_size)))
        if classifier.explainable:
            side = classifier.map_side
            specs.append(TensorSpec(CAM, "FP32", (-1, side, side)))
        if classifier.tag_rules is not None:
            specs.append(TensorSpec(TAGS, "BYTES", (-1,)))
        return specs

    # --- inference -----------------------------------------------------------------------
    async def infer(
        self, request: InferRequest, classifier: Classifier | None = None
    ) -> InferResponse:
        """``classifier``: the version admission chose for this request (else resolved)."""
        if classifier is None:
            classifier = self.check_model(request.model_name, request.model_version)
        if len(request.inputs) != 1:
            raise InvalidInferRequest(
                f"Send exactly one input ('{IMAGE_INPUT}' BYTES or '{TENSOR_INPUT}' FP32); "
                f"got {len(request.inputs)}."
            )
        outputs = self._requested(classifier, request)
        wants = LOGITS_ONLY.union(_WANTS[o.name] for o in outputs if o.name in _WANTS)
        classifier.check_outputs(wants)
        with priority.requested(request.priority or priority.current()):
            results = await self._run(classifier, request.inputs[0], wants)
        return InferResponse(
            model_name=classifier.name,
            model_version=classifier.version,
            id=request.id,
            outputs=[self._output(classifier, wanted, results, request) for wanted in outputs],
        )

    def _requested(self, classifier: Classifier, request: InferRequest) -> list[RequestedOutput]:
        if not request.outputs:
            return [RequestedOutput(PROBABILITIES, binary=request.binary_output)]
        names = [PROBABILITIES, EMBEDDING, CAM, TAGS]
        for wanted in request.outputs:
            if wanted.name == TAGS and classifier.tag_rules is None:
                raise InvalidInferRequest(
                    f"Model '{classifier.name}' has no tag rules (tags.yml beside it); "
                    f"ask for '{PROBABILITIES}'."
                )
            if wanted.name not in names:
                raise InvalidInferRequest(
                    f"Unknown output '{wanted.name}'; the model has "
                    + ", ".join(f"'{n}'" for n in names)
                    + "."
                )
            k = wanted.classification
            limit = classifier.options.max_top_k
            if k is not None and (wanted.name != PROBABILITIES or not 1 <= k <= limit):
                raise InvalidInferRequest(
                    f"classification applies to '{PROBABILITIES}', between 1 and {limit} "
                    f"(capped at the model's {classifier.max_top_k} classes); got {k} on "
                    f"'{wanted.name}'."
                )
            _check_target(classifier, wanted.target)
        _check_target(classifier, request.target)
        return request.outputs

    async def _run(
        self, classifier: Classifier, tensor: InputTensor, wants: Wants
    ) -> list[Classification]:
        limit = self._max_batch_files
        if tensor.name == IMAGE_INPUT:
            images = _image_elements(tensor, limit)
            outcomes = await classifier.classify_many(images, 1, wants=wants)
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, ServiceError):
                    outcome.detail = f"input '{IMAGE_INPUT}' element {index}: {outcome.detail}"
                    raise outcome
            return [o for o in outcomes if isinstance(o, Classification)]
        if tensor.name == TENSOR_INPUT:
            arrays = _preprocessed(tensor, classifier, limit)
            return list(
                await asyncio.gather(*(classifier.classify_array(a, 1, wants) for a in arrays))
            )
        raise InvalidInferRequest(
            f"Unknown input '{tensor.name}'; send '{IMAGE_INPUT}' (BYTES, encoded images) or "
            f"'{TENSOR_INPUT}' (FP32, preprocessed)."
        )

    def _output(
        self,
        classifier: Classifier,
        wanted: RequestedOutput,
        results: list[Classification],
        request: InferRequest,
    ) -> OutputTensor:
        if wanted.name == EMBEDDING:
            vectors = np.stack([l2_normalised(_present(r.embedding)) for r in results])
            return OutputTensor(
                EMBEDDING, "FP32", vectors.shape, array=vectors, binary=wanted.binary
            )
        if wanted.name == CAM:
            head = classifier.model.head
            assert head is not None, "check_outputs passed"
            target = wanted.target if wanted.target is not None else request.target
            maps = np.stack(
                [
                    class_activation_map(
                        _present(r.feature_map),
                        head,
                        r.prediction.indices[0] if target is None else target,
                    )
                    for r in results
                ]
            )
            return OutputTensor(CAM, "FP32", maps.shape, array=maps, binary=wanted.binary)
        if wanted.name == TAGS:
            elements = [_tags_json(r) for r in results]
            return OutputTensor(
                TAGS, "BYTES", (len(results),), elements=elements, binary=wanted.binary
            )
        if wanted.classification is None:
            probabilities = np.stack([r.probabilities for r in results])
            return OutputTensor(
                PROBABILITIES,
                "FP32",
                probabilities.shape,
                array=probabilities,
                binary=wanted.binary,
            )
        k = min(wanted.classification, classifier.max_top_k)  # [N, k] of what the model has
        labels = classifier.model.labels
        elements = []
        for result in results:
            indices, scores = top_k(result.probabilities, k)
            elements += [
                f"{s:f}:{i}:{labels[i]}".encode() for i, s in zip(indices, scores, strict=True)
            ]
        return OutputTensor(
            PROBABILITIES, "BYTES", (len(results), k), elements=elements, binary=wanted.binary
        )


def _tags_json(result: Classification) -> bytes:
    return json.dumps([dataclasses.asdict(tag) for tag in result.tags]).encode()


def _check_target(classifier: Classifier, target: object) -> None:
    if target is not None and not isinstance(target, int):
        raise InvalidInferRequest(f"target must be a class index; got {target!r}.")
    classifier.check_target(target)


def _present(array: Any) -> Any:
    assert array is not None, "asked of the forward"
    return array


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _image_elements(tensor: InputTensor, limit: int) -> list[bytes]:
    if tensor.datatype != "BYTES" or tensor.elements is None:
        raise InvalidInferRequest(
            f"Input '{IMAGE_INPUT}' is BYTES (encoded images); got {tensor.datatype}."
        )
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInferRequest(
            f"Input '{IMAGE_INPUT}' has shape [N] or [N, 1] with N >= 1; got {list(shape)}."
        )
    if shape[0] > limit:
        raise InvalidInferRequest(f"At most {limit} images per request; got {shape[0]}.")
    if len(tensor.elements) != shape[0]:
        raise InvalidInferRequest(
            f"Input '{IMAGE_INPUT}' has shape {list(shape)} but {len(tensor.elements)} elements."
        )
    return tensor.elements


def _preprocessed(tensor: InputTensor, classifier: Classifier, limit: int) -> list[Any]:
    side = classifier.model.spec.crop_size
    if tensor.datatype != "FP32" or tensor.array is None:
        raise InvalidInferRequest(
            f"Input '{TENSOR_INPUT}' is FP32 (preprocessed images); got {tensor.datatype}."
        )
    if tensor.array.ndim != 4 or tensor.array.shape[1:] != (3, side, side):
        raise InvalidInferRequest(
            f"Input '{TENSOR_INPUT}' has shape [N, 3, {side}, {side}]; got "
            f"{list(tensor.array.shape)}."
        )
    if not 1 <= tensor.array.shape[0] <= limit:
        raise InvalidInferRequest(
            f"Between 1 and {limit} images per request; got {tensor.array.shape[0]}."
        )
    if not np.isfinite(tensor.array).all():
        raise InvalidInferRequest(f"Input '{TENSOR_INPUT}' holds NaN or infinite values.")
    return list(tensor.array)
