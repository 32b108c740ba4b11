"""The typed results ``resnet-service bench``'s stages hand each other, and the whole run.

Each stage returns one of these frozen dataclasses; they become JSON only where
``bench.json`` is written (``BenchResult.to_json``), in exactly the shape the report, the
docs updater and the tests read. The smaller figures live beside what measures them:
``loadgen.LoadSummary`` (one load), ``servers.Memory``, ``ceiling.Ceiling``,
``fidelity.Fidelity``, ``ratios.BenchRatios``.

What stays a mapping, and why: the machine description (free-form, only written, shared with
the peers, HTTP-stack and robustness reports); figures keyed by data (runtime, precision,
image, layout, decode path), whose keys are not known in advance; the ratios' named figures
(their names carry runtimes and concurrencies). ``report.render_table`` and ``render_chart``
read the JSON document, because ``scripts/update_docs.py`` renders the same table from
``bench.json`` on disk. ``robustness.py`` and ``httpstack.py`` still build their reports as
dicts of ``LoadResult.summary()``: each scenario's dict is written as is, never read back by
another stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resnet_bench.ceiling import Ceiling
from resnet_bench.fidelity import Fidelity
from resnet_bench.jsonable import OMITTED_WHEN_NONE, to_json
from resnet_bench.loadgen import LoadSummary, at
from resnet_bench.servers import Memory
from resnet_service.config import RuntimeName

if TYPE_CHECKING:  # ratios reads these results: only its type is needed here
    from resnet_bench.ratios import BenchRatios


@dataclass(frozen=True)
class ServiceRun:
    """One runtime in one process layout over HTTP."""

    runtime: RuntimeName
    workers: int
    inference_threads: int
    layout: str
    cold_start_s: float
    #: Simultaneous single-image requests on an idle replica.
    burst: LoadSummary
    closed_loop: tuple[LoadSummary, ...]
    open_loop: LoadSummary
    #: The larger images and the Open Inference Protocol face: measured for the default
    #: runtime's chosen layout only (empty and None elsewhere).
    other_images: tuple[LoadSummary, ...]
    oip_v2_rest: LoadSummary | None
    requests_per_worker: dict[str, float]
    memory: Memory

    def at(self, concurrency: int) -> LoadSummary:
        return at(self.closed_loop, concurrency)


@dataclass(frozen=True)
class NaiveRun:
    """The naive tutorial baseline under the same closed loop."""

    layout: str
    closed_loop: tuple[LoadSummary, ...]
    memory: Memory

    def at(self, concurrency: int) -> LoadSummary:
        return at(self.closed_loop, concurrency)


@dataclass(frozen=True)
class CacheRun:
    """The response cache at 16 clients: distinct images with it off and on, one repeated
    image with it on."""

    distinct_images_cache_off: LoadSummary
    distinct_images_cache_on: LoadSummary
    repeated_image_cache_on: LoadSummary


@dataclass(frozen=True)
class InterleavedRounds:
    """Requests/s at one concurrency per configuration, round by round, and their medians."""

    concurrency: int
    rounds: int
    rps: dict[str, list[float]]
    median_rps: dict[str, float]


@dataclass(frozen=True)
class ImageInfo:
    """One benchmark image: its encoded size and its pixel size (width, height)."""

    bytes: int
    size: tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class Measurements:
    """Every stage's figures, in ``bench.json``'s order; a stage that did not run (quick mode,
    ``--skip-naive``, one runtime) is None here and absent from the JSON."""

    date: str
    quick: bool
    #: A free-form description of the host (``runner.machine_info``): written, not computed on.
    machine: dict[str, Any]
    images: dict[str, ImageInfo]
    #: Image -> decode path -> ms (and the served/previous ratio).
    decode_ms: dict[str, dict[str, float]]
    #: Runtime -> precision -> "batch_N" -> ms per image.
    forward_ms_per_image: dict[str, dict[str, dict[str, float]]]
    ceiling_by_runtime: dict[str, Ceiling]
    fidelity: Fidelity | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    service_by_runtime: dict[str, ServiceRun]
    runtime_choice: InterleavedRounds | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    default_runtime: RuntimeName
    #: The default runtime by process layout ("workers_N").
    service: dict[str, ServiceRun]
    layout_choice: InterleavedRounds | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    service_default_layout: str
    engine_in_process: list[LoadSummary]
    response_cache: CacheRun | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    naive: NaiveRun | None = field(default=None, metadata=OMITTED_WHEN_NONE)

    @property
    def default_service(self) -> ServiceRun:
        """The default runtime in its default layout: the service as deployed."""
        return self.service[self.service_default_layout]


@dataclass(frozen=True)
class BenchResult:
    """The whole run: what ``bench.json`` holds."""

    measured: Measurements
    ratios: BenchRatios
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            **to_json(self.measured),
            "ratios": self.ratios.to_json(),
            "seconds": self.seconds,
        }
