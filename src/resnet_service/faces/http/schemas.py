"""Response bodies, named by role. These are the public JSON contract (see openapi/)."""

from __future__ import annotations

import weakref
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.json_schema import SkipJsonSchema

from resnet_service.core.classifier import Classifier
from resnet_service.core.model_info import MeasuredOn, ModelInfo

_TOP_K: Final = (
    "How many predictions were asked for, as served: the request's top_k (or the default) "
    "capped at the model's class count."
)


class Prediction(BaseModel):
    """One class of the Top-k."""

    label: str = Field(description="Human-readable class name.", examples=["tabby"])
    index: int = Field(ge=0, description="Class index in the model's output.", examples=[281])
    score: float = Field(ge=0, le=1, description="Softmax probability.", examples=[0.83])


class Tag(BaseModel):
    """A tag from the model's rules: the summed probability of its classes."""

    name: str = Field(examples=["cat"])
    score: float = Field(ge=0, le=1, description="Summed probability of its classes.")
    categories: list[str] = Field(examples=[["animal", "pet"]])
    aliases: list[str] = Field(examples=[["kitten"]])


_TAGS: Final = (
    "Tags from the model's rules (tags.yml), best first; empty when none clears its threshold "
    "or the model has no rules."
)


class ModelRef(BaseModel):
    """Which model answered: enough provenance to tell deployments apart."""

    name: str = Field(description="The model's name (its folder in a model repository).")
    version: str = Field(description="The version that answered.")
    precision: Literal["int8", "fp32"]
    runtime: Literal["torch", "openvino", "onnxruntime"] = Field(
        description="The inference runtime that ran the model."
    )
    weights_sha256: str = Field(description="First 12 hex digits of the weights' sha256.")
    random_weights: bool = Field(
        description="True only in development mode: the predictions are meaningless."
    )


_MODEL_REFS: weakref.WeakKeyDictionary[Classifier, ModelRef] = weakref.WeakKeyDictionary()


def model_ref(classifier: Classifier) -> ModelRef:
    """Which model answers (built once per classifier: its model never changes)."""
    ref = _MODEL_REFS.get(classifier)
    if ref is None:
        info = classifier.model.info
        ref = _MODEL_REFS[classifier] = ModelRef(
            name=classifier.name,
            version=classifier.version,
            precision=info.precision,
            runtime=info.runtime,
            weights_sha256=info.weights_sha256[:12],
            random_weights=info.random_weights,
        )
    return ref


class Timings(BaseModel):
    """Where the request's time went, in milliseconds."""

    decode_ms: float = Field(ge=0, description="Decoding and preprocessing the image.")
    queue_ms: float = Field(ge=0, description="Waiting for the model.")
    inference_ms: float = Field(ge=0, description="The model's forward pass (whole batch).")
    total_ms: float = Field(ge=0, description="From the upload being read to the answer.")


class ClassifyResponse(BaseModel):
    """Top-k for one image."""

    predictions: list[Prediction] = Field(description="Best first.")
    tags: list[Tag] = Field(description=_TAGS)
    top_k: int = Field(ge=1, description=_TOP_K)
    model: ModelRef
    timings: Timings
    batch_size: int = Field(ge=1, description="How many images shared the forward pass.")


class ItemError(BaseModel):
    """Why one image of a batch failed (same code and status as /classify would give)."""

    code: str = Field(examples=["unsupported_image_format"])
    status: int = Field(ge=400, le=599, examples=[415])
    title: str
    detail: str


class BatchItem(BaseModel):
    """What every batch route says of one image; its result or its error, never both."""

    index: int = Field(ge=0, description="Position in the request.")
    filename: str | None
    timings: Timings | None = None
    error: ItemError | None = None


class BatchItemResult(BatchItem):
    """One image of a batch: predictions or an error."""

    predictions: list[Prediction] | None = None
    tags: list[Tag] | None = Field(None, description=_TAGS)


class BatchTotals(BaseModel):
    """What every batch route says of the whole request."""

    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    model: ModelRef
    total_ms: float = Field(ge=0)


class BatchResponse(BatchTotals):
    """Results in request order."""

    top_k: int = Field(ge=1, description=_TOP_K)
    results: list[BatchItemResult]


class EmbeddingFormat(BaseModel):
    """How the vectors of a response are written."""

    encoding: Literal["json", "float16", "float32"] = Field(
        description="json: a list of numbers; float16/float32: base64 of the little-endian "
        "values (numpy: np.frombuffer(base64.b64decode(s), '<f4'))."
    )
    dimensions: int = Field(ge=1, description="The vector's length (512 for ResNet18).")
    normalized: bool = Field(description="True: L2-normalised (cosine = dot product).")


class EmbedResponse(EmbeddingFormat):
    """One image's embedding: the pooled features in front of the classifier. Vectors are
    comparable only within one model (name, version and weights say which space)."""

    embedding: list[float] | str
    model: ModelRef
    timings: Timings
    batch_size: int = Field(ge=1, description="How many images shared the forward pass.")


class EmbedBatchItem(BatchItem):
    """One image of a batch: its embedding or an error."""

    embedding: list[float] | str | None = None


class EmbedBatchResponse(EmbeddingFormat, BatchTotals):
    """Embeddings in request order."""

    results: list[EmbedBatchItem]


class CropBoxModel(BaseModel):
    """Where the model's centre crop lies in the image as sent (upright, its pixels)."""

    left: float
    top: float
    right: float
    bottom: float


class ClassActivationMap(BaseModel):
    """Why the model gave the target class its score: the class activation map at the last
    stage (equal to Grad-CAM there for this head)."""

    grid: list[list[float]] = Field(
        description="h x w (7 x 7): each cell's contribution to the target's logit (they sum "
        "to the logit minus the class's bias); row 0 is the top of the crop."
    )
    heatmap_png: str = Field(
        description="base64 PNG of the map's positive part over its maximum, upsampled to "
        "the crop the model saw; its alpha follows the heat (see-through where cold)."
    )
    heatmap_size: int = Field(ge=1, description="The PNG's side in pixels (the crop size).")
    crop_box: CropBoxModel = Field(description="Draw the PNG over this box of the image.")
    image_width: int = Field(ge=1, description="The image as sent, upright.")
    image_height: int = Field(ge=1)


class ExplainResponse(BaseModel):
    """Top-k for one image and the class activation map of the target class."""

    predictions: list[Prediction] = Field(description="Best first.")
    top_k: int = Field(ge=1, description=_TOP_K)
    target: Prediction = Field(description="The class explained, with its score.")
    cam: ClassActivationMap
    model: ModelRef
    timings: Timings
    batch_size: int = Field(ge=1)


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response."""

    type: str = Field("about:blank", description="A URI naming the problem type.")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    code: str = Field(description="Stable, machine-readable error code.")
    instance: str | None = Field(None, description="The request path.")
    request_id: str | None = None
    trace_id: str | None = Field(
        None, description="The OpenTelemetry trace id of the request, when tracing is on."
    )
    errors: list[dict[str, Any]] | None = Field(
        None, description="Field-level validation errors (422)."
    )


#: What a person reads first in /model; the rest follows in ModelInfo's order.
_MODEL_FIRST: Final = ("name", "version", "architecture", "num_classes", "precision", "runtime")


class ModelResponse(ModelInfo):
    """The served model (ModelInfo, minus server paths), its version and the settings that
    shape its behaviour."""

    version: str = Field(description="The version that answers requests naming none.")
    settings: dict[str, int | float | str | bool] = Field(
        description="The settings that shape behaviour: threads, batching, limits."
    )
    host: MeasuredOn = Field(
        description="This host's CPU and instruction-set level: int8 figures hold where "
        "fidelity.measured_on names the same level."
    )
    embedding_size: int | None = Field(
        description="The length of /embed's vectors (None: this model cannot embed)."
    )
    explainable: bool = Field(description="True when /explain can map this model's classes.")
    labels: list[str] | None = Field(
        None, description="Every class label in index order, with ?labels=true (else null)."
    )
    # Places on the server's disk: never in an unauthenticated answer.
    weights_path: SkipJsonSchema[str | None] = Field(None, exclude=True)
    int8_cache: SkipJsonSchema[str | None] = Field(None, exclude=True)

    # No return annotation on purpose: pydantic would publish it as the response's schema.
    @model_serializer(mode="wrap")
    def _reading_order(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        body: dict[str, Any] = handler(self)
        first = {key: body[key] for key in _MODEL_FIRST}
        return {**first, "settings": body["settings"], **body}


class VersionStatus(BaseModel):
    """One version of a model in this worker."""

    version: str
    state: Literal["AVAILABLE", "LOADING", "READY", "UNLOADING", "UNAVAILABLE"] = Field(
        description="AVAILABLE: not loaded, loads on the first request (models on demand)."
    )
    reason: str = Field(description="Why it is not READY (a failed build or load).")
    serving: bool = Field(
        description="True for the version requests naming none get (with a traffic split: "
        "every version with a share)."
    )
    memory_mb: float | None = Field(
        description="Resident memory its load added to this worker (MiB; for an AVAILABLE "
        "version, what its last load took)."
    )
    last_used: datetime | None = Field(
        None, description="When a request last reached it in this worker (null: not loaded)."
    )
    traffic_share: float | None = Field(
        None,
        description="Its share of the requests that name no version, from the model's traffic "
        "split (null: no split).",
    )
    traffic_stopped: str | None = Field(
        None, description="Why its traffic share was stopped (the shadow rule)."
    )
    runtime: Literal["torch", "openvino", "onnxruntime"] | None
    precision: Literal["int8", "fp32"] | None
    num_classes: int | None
    tag_rules: str | None = Field(
        None, description="Where its tag rules come from (a file name; null: no tags)."
    )
    tags: int | None = Field(None, description="How many tags its rules define.")
    tag_rules_problem: str | None = Field(
        None,
        description="Why a changed rules file was refused (its line and reason); the rules "
        "named in tag_rules keep serving until the file is fixed.",
    )


class ShadowState(BaseModel):
    """A model's shadow version: requests also run there, answers compared, never returned."""

    version: str
    fraction: float = Field(description="The share of the model's requests shadowed.")
    compared: int = Field(description="Requests compared so far in this worker.")
    skipped: int = Field(
        description="Shadowed requests not compared (the shadow not loaded or busy)."
    )
    agreement: float | None = Field(description="Top-1 agreement over the window.")
    score_drift: float | None = Field(
        description="Mean absolute difference of the served top class's score, over the window."
    )
    stopped: str | None = Field(description="Why the stop rule stopped the version's traffic.")


class ModelStatus(BaseModel):
    name: str
    pinned: bool = Field(False, description="Kept loaded (models on demand).")
    versions: list[VersionStatus] = Field(description="Highest first.")
    shadow: ShadowState | None = None


class ModelsResponse(BaseModel):
    """The model repository as this worker serves it."""

    default: str | None = Field(description="The model of requests that name none.")
    models: list[ModelStatus]


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Readiness: model loaded, warmed and not draining."""

    status: Literal["ready"] = "ready"
    model: ModelRef | None = Field(
        description="The default model (null: a repository of several with none named)."
    )
