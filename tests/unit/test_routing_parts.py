"""The parts of version routing: the traffic split's shares, a repository config's traffic and
shadow, and the shadow's window and stop rule (fed comparisons directly)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from resnet_service.core.results import Classification, Prediction, Timings
from resnet_service.model.repository_layout import ModelConfig, RepositoryModel, VersionDir
from resnet_service.service.metrics import Metrics
from resnet_service.service.routing import _split
from resnet_service.service.shadow import Shadow, ShadowRule
from resnet_service.service.traffic import TrafficSplit


def test_a_split_gives_each_version_its_exact_share_and_skips_those_that_cannot_serve() -> None:
    split = TrafficSplit({"2": 90, "1": 10})
    picks = Counter(split.pick(lambda v: True) for _ in range(1000))
    assert picks == {"2": 900, "1": 100}
    # Over any ten requests, one goes to the canary (no run of bad luck).
    window = [split.pick(lambda v: True) for _ in range(10)]
    assert window.count("1") == 1
    assert {split.pick(lambda v: v == "2") for _ in range(20)} == {"2"}
    split.stop("2", "disagrees")
    assert split.pick(lambda v: True) == "1"
    assert split.pick(lambda v: v == "2") is None
    shares = {s.version: (s.share, s.stopped) for s in split.shares(lambda v: True)}
    assert shares == {"2": (0.0, "disagrees"), "1": (1.0, None)}


def test_a_config_s_traffic_and_shadow_versions_are_served_and_checked() -> None:
    config = ModelConfig.model_validate(
        {"traffic": {"3": 90, "1": 10}, "shadow": {"version": 2, "fraction": 0.2}}
    )
    versions = tuple(VersionDir("m", n, None, "artifact", "") for n in (1, 2, 3))  # type: ignore[arg-type]
    model = RepositoryModel("m", config, versions)
    # The policy serves the latest only; the split and the shadow add theirs.
    assert [v.version for v in model.wanted()] == [3, 2, 1]
    # A shadow without a split: the policy serves the highest other version, which gets
    # every request that names none.
    shadowed = RepositoryModel(
        "m", ModelConfig.model_validate({"shadow": {"version": 3}}), versions
    )
    assert [v.version for v in shadowed.wanted()] == [3, 2]
    split = _split(shadowed)
    assert split is not None
    assert {split.pick(lambda v: True) for _ in range(5)} == {"2"}
    assert _split(RepositoryModel("m", ModelConfig(), versions)) is None
    for bad in ({"traffic": {"1": -1}}, {"traffic": {"1": 0}}, {"traffic": {"0": 1}}):
        with pytest.raises(ValidationError):
            ModelConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"shadow": {"version": 2, "fraction": 0}})


def answer(label_index: int, score: float, classes: int = 4) -> Classification:
    probabilities = np.full(classes, (1 - score) / (classes - 1), dtype=np.float32)
    probabilities[label_index] = score
    labels = [f"c{label_index}"]
    return Classification(
        Prediction([label_index], [score], labels, 1), Timings(0, 0, 0, 0), probabilities
    )


def test_the_shadow_window_measures_agreement_and_drift_and_the_rule_stops_once_full() -> None:
    stops: list[str] = []
    rule = ShadowRule("2", fraction=0.5, min_agreement=0.8, window=10)
    shadow = Shadow("m", rule, lambda: None, stops.append, Metrics())
    # Every second offer is due (deterministic, like the split).
    assert [shadow._due() for _ in range(6)] == [False, True] * 3
    shadow.offer(b"", answer(0, 0.9), np.zeros((1, 1, 3), np.uint8), busy=True)
    shadow.offer(b"", answer(0, 0.9), np.zeros((1, 1, 3), np.uint8), busy=True)
    assert shadow.status().skipped == 1  # one was due, and skipped: the primary was busy
    for i in range(9):  # 7 of 9 agree: below 0.8, but the window is not full yet
        shadow._record(answer(0, 0.9), answer(0 if i < 7 else 1, 0.6))
    status = shadow.status()
    assert status.agreement == pytest.approx(7 / 9)
    assert status.score_drift == pytest.approx((7 * 0.3 + 2 * abs(0.9 - 0.4 / 3)) / 9, rel=1e-5)
    assert stops == []
    assert status.stopped is None
    shadow._record(answer(0, 0.9), answer(0, 0.9))  # full: 8 of 10 agree, at the bound
    assert stops == []
    shadow._record(answer(0, 0.9), answer(1, 0.9))  # 7 of the last 10: below
    assert len(stops) == 1
    assert "0.700" in stops[0]
    assert shadow.status().stopped == stops[0]
    assert not shadow._due()  # a stopped shadow compares no more
