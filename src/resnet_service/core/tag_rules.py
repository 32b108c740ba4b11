"""Tags a person can use, from a model's class probabilities: each tag is a set of classes (a
hierarchy node stands for every leaf under it) with its own threshold, a priority, categories
and aliases. A tag's score is the summed probability of its classes; an image gets the tags
whose score clears both their threshold and the rules' floor, by priority then score, at most
``max_tags`` of them. The rules are compiled once into a 0/1 matrix, so scoring an image is one
small matrix-vector product (about 50 tags x 1,000 classes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class TagRule:
    """One tag: its classes (indices into the model's output) and how it is shown."""

    name: str
    classes: tuple[int, ...]
    threshold: float
    priority: int = 0
    categories: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Tag:
    """A tag an image got, with its score (the summed probability of its classes)."""

    name: str
    score: float
    categories: tuple[str, ...]
    aliases: tuple[str, ...]


class TagRules:
    """A model's compiled rules; immutable, so a reload swaps the whole object."""

    def __init__(
        self,
        rules: Sequence[TagRule],
        num_classes: int,
        *,
        floor: float = 0.0,
        max_tags: int = 10,
        source: str = "",
    ) -> None:
        self.rules = tuple(rules)
        self.floor = floor
        self.max_tags = max_tags
        #: Where the rules came from (a file, or the package's defaults): said by /models.
        self.source = source
        self._members = np.zeros((len(self.rules), num_classes), dtype=np.float64)
        for row, rule in enumerate(self.rules):
            self._members[row, list(rule.classes)] = 1.0
        self._cutoff = np.array([max(r.threshold, floor) for r in self.rules], dtype=np.float64)
        # Best first: higher priority, then the rule's place in the file (stable).
        self._priority = np.array([-r.priority for r in self.rules], dtype=np.int64)

    def scores(self, probabilities: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Every rule's score for one image's probabilities (in rule order)."""
        result: npt.NDArray[np.float64] = self._members @ probabilities.astype(np.float64)
        return result

    def tags(self, probabilities: npt.NDArray[np.floating]) -> tuple[Tag, ...]:
        """The tags one image gets, best first."""
        if not self.rules:
            return ()
        scores = self.scores(probabilities)
        passed = np.flatnonzero(scores >= self._cutoff)
        if passed.size == 0:
            return ()
        order = passed[np.lexsort((-scores[passed], self._priority[passed]))][: self.max_tags]
        return tuple(
            Tag(
                name=self.rules[i].name,
                score=min(float(scores[i]), 1.0),  # float32 probabilities sum to 1 +- 1e-7
                categories=self.rules[i].categories,
                aliases=self.rules[i].aliases,
            )
            for i in order
        )
