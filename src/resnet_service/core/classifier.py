"""The transport-free core: image bytes (or preprocessed arrays) -> Top-k, shared by every face.

Decoding runs on a bounded pool of plain threads (``core.decode_stage``, never the event loop);
the model runs on the engine thread. The HTTP routes, the Open Inference Protocol faces and the
CLI all call ``classify``/``classify_many``, so the input contract, the limits and the numbers
are the same everywhere. Admission (``admit``) is by predicted wait, decided before an upload is read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Context, copy_context
from dataclasses import dataclass
from typing import Final, Protocol

from resnet_service.core import priority
from resnet_service.core.admission import AdmissionPolicy, Ticket, Workload
from resnet_service.core.decode_stage import (
    DecodeLimits,
    DecodeObserver,
    DecodeStage,
    Queued,
)
from resnet_service.core.engine import (
    ComputeGate,
    InferenceEngine,
    Probabilities,
    Scores,
)
from resnet_service.core.engine_spans import child_span
from resnet_service.core.errors import (
    InvalidParameter,
    NotReady,
    OutputUnavailable,
    Overloaded,
    ServiceError,
)
from resnet_service.core.feature_outputs import CropBox, class_activation_map, heatmap_png
from resnet_service.core.images import (
    ImageLimits,
    Pixels,
    Tensor3,
    crop_source_box,
    install_bomb_guard,
    normalise_pixels,
)
from resnet_service.core.response_cache import ResponseCache
from resnet_service.core.results import Classification, Explanation, Prediction, Timings, top_k
from resnet_service.core.runtime import LOGITS_ONLY, Output, ServedModel, Wants
from resnet_service.core.tag_rules import Tag, TagRules

log = logging.getLogger(__name__)

#: The version of a model served without a repository (a repository names its own).
MODEL_VERSION: Final = "1"

#: Decode + preprocess of a typical photo before anything was measured (admission's prior).
_INITIAL_DECODE_S: Final = 0.005
#: What ``/embed`` and ``/explain`` ask the forward for besides the logits.
EMBEDDING: Final[Wants] = frozenset({Output.LOGITS, Output.EMBEDDING})
FEATURE_MAP: Final[Wants] = frozenset({Output.LOGITS, Output.FEATURE_MAP})


@dataclass(frozen=True, slots=True)
class ClassifierOptions:
    """What a classifier uses of the service's settings, in its own units. Built from the
    settings where they are read (``service.loading.classifier_options``): the core never
    sees the whole ``Settings``."""

    #: Decode threads of this classifier (resolved: never 0).
    decode_threads: int
    limits: ImageLimits
    #: ``fast``: resample only the crop's source region; ``exact``: the reference's resize.
    preprocessing: str
    #: Requests may ask for at most this many classes (a model with fewer gets all of its).
    max_top_k: int
    default_top_k: int
    max_batch_size: int
    max_batch_wait_s: float
    queue_capacity: int
    request_timeout_s: float
    shutdown_grace_s: float
    admission: AdmissionPolicy
    #: Answers to repeated images, per worker (0: off).
    response_cache_bytes: int = 0


class ShadowTap(Protocol):
    """Where a classifier offers what it answered, to be run again on a shadow version
    (``service.shadow``): called on the event loop, it must return at once."""

    def offer(self, data: bytes, primary: Classification, pixels: Pixels) -> None: ...


@dataclass(slots=True)
class _Slot:
    """One image's place in the pipeline; ``waited_s`` is set once it was served."""

    waited_s: float | None = None


class Classifier:
    """Owns the decode pool, the inference engine and admission for one served model."""

    def __init__(
        self,
        model: ServedModel,
        options: ClassifierOptions,
        observer: DecodeObserver | None = None,
        *,
        name: str | None = None,
        version: str = MODEL_VERSION,
        compute: ComputeGate | None = None,
        tag_rules: TagRules | None = None,
        own_labels: list[str] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        #: The name and version requests reach it by (a repository's folder names).
        self.name = name or model.info.name
        self.version = version
        #: Set once the version is leaving (a repository swap): no new request is admitted.
        self.retiring = False
        #: The model's tag rules (None: no tags); swapped whole when its file changes.
        self.tag_rules = tag_rules
        #: Why a new rules file was refused while these rules kept serving (None: no problem).
        self.tag_rules_problem: str | None = None
        #: The model's own labels, which tag rules name (``model.labels`` may be display names).
        self.own_labels: list[str] = list(own_labels or model.labels)
        #: When a request last reached it (monotonic; models on demand unload the least
        #: recently used).
        self.last_used = time.monotonic()
        #: A shadow version's tap (None: no shadow); set and cleared by the repository.
        self.shadow: ShadowTap | None = None
        self.inference_threads = model.runtime.threads
        self.decode_threads = options.decode_threads
        self.limits = options.limits
        self.fast = options.preprocessing == "fast"
        self.max_top_k = min(options.max_top_k, model.info.num_classes)
        spec = model.spec
        self.input_shape = (3, spec.crop_size, spec.crop_size)
        self.engine = InferenceEngine(
            model.runtime,
            model.info.num_classes,
            max_batch_size=options.max_batch_size,
            max_batch_wait_s=options.max_batch_wait_s,
            queue_capacity=options.queue_capacity,
            input_shape=self.input_shape,
            observer=observer,
            normalise=functools.partial(normalise_pixels, spec=spec),
            compute=compute,
            trace_attributes={
                "model.name": self.name,
                "model.version": version,
                "runtime": model.info.runtime,
                "precision": model.info.precision,
            },
        )
        self.workload = Workload(options.admission, _INITIAL_DECODE_S)
        self._observer = observer
        self.decoding = DecodeStage(
            DecodeLimits(
                threads=self.decode_threads,
                images=self.limits,
                spec=spec,
                fast=self.fast,
                request_timeout_s=options.request_timeout_s,
                batch=options.max_batch_size,
                queue_capacity=options.queue_capacity,
            ),
            self.engine,
            self.workload,
            observer,
        )
        self.cache: ResponseCache | None = None
        if options.response_cache_bytes > 0:
            info = model.info
            self.cache = ResponseCache(
                options.response_cache_bytes,
                f"{info.name}|{info.weights_sha256}|{info.runtime}|{info.precision}|"
                f"{options.preprocessing}",
            )

    def start(self) -> None:
        """Warm the model up on its thread; returns when ready."""
        install_bomb_guard()
        self.engine.start(warmup=True)
        self.workload.cost_s = self.engine.per_item_s + _INITIAL_DECODE_S

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work (within ``timeout``), then stop the engine and the decode pool."""
        self.engine.stop(self.options.shutdown_grace_s if timeout is None else timeout)
        self.decoding.shutdown()
        self.model.runtime.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def idle(self) -> bool:
        """No admitted request and no image in its pipeline: safe to stop."""
        return self.workload.open <= 0 and self.workload.processing <= 0

    def check_top_k(self, top_k: int | None) -> int:
        """The ``top_k`` served: the request's or the default, capped at the model's class
        count (a generic client asking for 5 gets all 3 of a small model, as documented);
        outside 1..``max_top_k`` of the settings it is refused."""
        limit = self.options.max_top_k
        if top_k is not None and not 1 <= top_k <= limit:
            raise InvalidParameter(
                f"top_k must be between 1 and {limit} (above the model's "
                f"{self.model.info.num_classes} classes it is capped); got {top_k}"
            )
        return min(self.options.default_top_k if top_k is None else top_k, self.max_top_k)

    def admit(self) -> Ticket:
        """Admission for one request, decided before its upload is read: ``NotReady`` while
        the model loads, ``Overloaded`` (with Retry-After) when it would wait too long."""
        if not self.engine.ready:
            raise NotReady("the model is not ready (starting up or shutting down)")
        self.last_used = time.monotonic()
        return self.workload.admit(priority.current())

    async def decode(
        self, data: bytes, wants: Wants = LOGITS_ONLY, context: Context | None = None
    ) -> Queued:
        """Decode on the pool and queue for the model (``core.decode_stage``)."""
        return await self.decoding.decode(data, wants, context)

    # --- classification ------------------------------------------------------------------
    async def classify(
        self, data: bytes, top_k: int | None = None, scope: str = "", wants: Wants = LOGITS_ONLY
    ) -> Classification:
        """Bytes -> Top-k (and the outputs ``wants`` names); raises a ``ServiceError`` subclass
        for anything the caller can fix. ``scope``: whose cached answers this caller may share
        (see ``response_cache``)."""
        k = self.check_top_k(top_k)
        if wants != LOGITS_ONLY:
            self.check_outputs(wants)
        return await self._classify(data, k, scope, wants)

    @property
    def embedding_size(self) -> int | None:
        """The embedding's length, or None when this model cannot give one."""
        head = self.model.head
        return head.embedding_size if head and Output.EMBEDDING in self.engine.outputs else None

    @property
    def map_side(self) -> int:
        """The side of the last stage's map: ResNet's stride is 32 (7 at 224 pixels)."""
        return -(-self.model.spec.crop_size // 32)

    @property
    def explainable(self) -> bool:
        return self.model.head is not None and Output.FEATURE_MAP in self.engine.outputs

    def check_outputs(self, wants: Wants) -> None:
        """``OutputUnavailable`` when this model cannot give what ``wants`` names."""
        missing = wants - self.engine.outputs
        if self.model.head is None:  # an artifact from before the head was kept beside it
            missing |= wants - {Output.LOGITS}
        if missing:
            raise OutputUnavailable(
                f"model {self.name} version {self.version} was built without "
                f"{' and '.join(sorted(missing))} outputs (an artifact from an older "
                "resnet-service); rebuild it (`resnet-service quantize`) to embed or explain"
            )

    def check_target(self, target: int | None) -> None:
        classes = self.model.info.num_classes
        if target is not None and not 0 <= target < classes:
            raise InvalidParameter(
                f"target must be a class index between 0 and {classes - 1}, or top1; got {target}"
            )

    async def classify_array(
        self, array: Tensor3, top_k: int | None = None, wants: Wants = LOGITS_ONLY
    ) -> Classification:
        """An already preprocessed CHW float32 array -> Top-k (no decode)."""
        k = self.check_top_k(top_k)
        self.check_outputs(wants)
        if array.shape != self.input_shape:
            raise InvalidParameter(
                f"a preprocessed image must have shape {list(self.input_shape)}; "
                f"got {list(array.shape)}"
            )
        started = time.perf_counter()
        with self._in_pipeline() as slot:
            result = await self._infer(array, 0.0, k, started, wants)
            slot.waited_s = result.timings.queue_s
            return result

    async def classify_pixels(self, pixels: Pixels, top_k: int | None = None) -> Classification:
        """Model-sized pixels another version of this model decoded -> Top-k (no decode)."""
        k = self.check_top_k(top_k)
        if not self.engine.accepts(pixels):
            raise InvalidParameter(f"pixels of shape {list(pixels.shape)} do not fit this model")
        started = time.perf_counter()
        with self._in_pipeline() as slot:
            result = await self._infer(pixels, 0.0, k, started)
            slot.waited_s = result.timings.queue_s
            return result

    async def _classify(
        self, data: bytes, k: int, scope: str = "", wants: Wants = LOGITS_ONLY
    ) -> Classification:
        started = time.perf_counter()
        key = None
        if self.cache is not None and wants == LOGITS_ONLY:
            key = self.cache.key(data, scope)
            found = self.cache.get(key)
            if self._observer:
                self._observer.cache_lookup(found is not None, self.cache.bytes)
            if found is not None:
                return self._from_cache(found, k, started)
        with self._in_pipeline() as slot:
            request = copy_context()  # the batch links to the request's span, not decode's
            with child_span("decode"):
                queued = await self.decode(data, wants, request)
            decoded = queued.decoded
            scores = await self.engine.answer(queued.scores, self.options.request_timeout_s)
            result = self._classification(scores, decoded.decode_s, k, started, decoded.size)
            slot.waited_s = decoded.waited_s + result.timings.queue_s
        if key is not None and self.cache is not None:
            self.cache.put(key, result.probabilities)
        if self.shadow is not None:
            self.shadow.offer(data, result, decoded.array)
        return result

    def _from_cache(self, probabilities: Probabilities, k: int, started: float) -> Classification:
        timings = Timings(0.0, 0.0, 0.0, time.perf_counter() - started)
        prediction = self._prediction(probabilities, k, batch_size=1)
        tags = self._tags(probabilities)
        return Classification(prediction, timings, probabilities, cached=True, tags=tags)

    def _tags(self, probabilities: Probabilities) -> tuple[Tag, ...]:
        """The tags of the rules in force now (a reload swaps ``tag_rules`` whole)."""
        rules = self.tag_rules
        return rules.tags(probabilities) if rules else ()

    def _prediction(self, probabilities: Probabilities, k: int, batch_size: int) -> Prediction:
        indices, values = top_k(probabilities, k)
        labels = [self.model.labels[i] for i in indices]
        return Prediction(indices=indices, scores=values, labels=labels, batch_size=batch_size)

    @contextmanager
    def _in_pipeline(self) -> Iterator[_Slot]:
        """Counts one image in the pipeline (admission's measure of work) while it runs, and
        reports how long it queued (admission's measure of a standing queue)."""
        if not self.engine.ready:
            raise NotReady("the model is not ready (starting up or shutting down)")
        self.workload.started()
        slot = _Slot()
        try:
            yield slot
        except Overloaded:
            self.workload.shed()
            raise
        finally:
            self.workload.finished(1, slot.waited_s)

    async def _infer(
        self,
        array: Tensor3 | Pixels,
        decode_s: float,
        k: int,
        started: float,
        wants: Wants = LOGITS_ONLY,
        size: tuple[int, int] | None = None,
    ) -> Classification:
        scores: Scores = await self.engine.infer(array, self.options.request_timeout_s, wants)
        return self._classification(scores, decode_s, k, started, size)

    def _classification(
        self,
        scores: Scores,
        decode_s: float,
        k: int,
        started: float,
        size: tuple[int, int] | None = None,
    ) -> Classification:
        return Classification(
            self._prediction(scores.probabilities, k, scores.batch_size),
            Timings(
                decode_s=decode_s,
                queue_s=scores.queue_s,
                inference_s=scores.inference_s,
                total_s=time.perf_counter() - started,
            ),
            scores.probabilities,
            embedding=scores.embedding,
            feature_map=scores.feature_map,
            size=size,
            tags=self._tags(scores.probabilities),
        )

    async def classify_many(
        self,
        images: list[bytes],
        top_k: int | None = None,
        scope: str = "",
        wants: Wants = LOGITS_ONLY,
    ) -> list[Classification | ServiceError]:
        """Many images at once: each gets a result or its own error, in order. At most half the
        queue is in flight per call, so a long list waits its turn instead of being refused,
        while its images still reach the engine together and share batches."""
        k = self.check_top_k(top_k)
        self.check_outputs(wants)
        gate = asyncio.Semaphore(max(1, self.options.queue_capacity // 2))

        async def one(data: bytes) -> Classification:
            async with gate:
                return await self._classify(data, k, scope, wants)

        results = await asyncio.gather(*(one(data) for data in images), return_exceptions=True)
        out: list[Classification | ServiceError] = []
        for result in results:
            if isinstance(result, Classification | ServiceError):
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
        return out

    # --- beyond Top-k --------------------------------------------------------------------
    async def embed(self, data: bytes) -> Classification:
        """Bytes -> Top-1 and the embedding (raw: the faces normalise on request)."""
        self.check_outputs(EMBEDDING)
        return await self._classify(data, 1, wants=EMBEDDING)

    async def explain(
        self, data: bytes, top_k: int | None = None, target: int | None = None
    ) -> Explanation:
        """Bytes -> Top-k and the class activation map of ``target`` (default: the top class)."""
        k = self.check_top_k(top_k)
        self.check_target(target)
        self.check_outputs(FEATURE_MAP)
        return await self.explanation(await self._classify(data, k, wants=FEATURE_MAP), target)

    async def explanation(self, result: Classification, target: int | None) -> Explanation:
        """The map of ``target`` (default: the top class) for a result that has its feature
        map; the PNG is drawn on the decode pool, off the event loop."""
        assert result.feature_map is not None, "asked without the feature map"
        assert self.model.head is not None, "check_outputs lets no head-less model here"
        chosen = result.prediction.indices[0] if target is None else target
        grid = class_activation_map(result.feature_map, self.model.head, chosen)
        side = self.model.spec.crop_size
        png = await asyncio.to_thread(heatmap_png, grid, side)
        box = None
        if result.size is not None:
            box = CropBox(*crop_source_box(*result.size, self.model.spec))
        return Explanation(result, chosen, grid, png, side, box)
