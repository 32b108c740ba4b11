"""Traffic split between a model's versions (a canary): which version a request that names
none gets, by the weights of the model's config.

Smooth weighted round-robin (nginx's upstream algorithm), not a random draw: each worker gives
every version exactly its share of the requests it serves, give or take one request, so a
90/10 split is 10% over any hundred requests, where a draw would wander by ±2 points over a
thousand. A version that cannot serve (failed, being removed) is skipped and its share goes to
the others; a stopped version (the shadow rule, see ``service.shadow``) gets none until the
config changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Share:
    """One version's place in the split, as ``/models`` reports it."""

    version: str
    weight: float
    #: Its share of the requests now (0 when stopped or unable to serve).
    share: float
    stopped: str | None


class TrafficSplit:
    """The weights of one model's versions and the round-robin state over them."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = {version: w for version, w in weights.items() if w > 0}
        self._current = dict.fromkeys(self.weights, 0.0)
        #: Stopped versions and why (the shadow rule).
        self._stopped: dict[str, str] = {}
        self._lock = threading.Lock()  # the HTTP loop and the gRPC loop both pick

    def pick(self, usable: Callable[[str], bool]) -> str | None:
        """The version for the next request among those ``usable`` says can serve it."""
        with self._lock:
            live = {v: w for v, w in self.weights.items() if v not in self._stopped and usable(v)}
            if not live:
                return None
            for version, weight in live.items():
                self._current[version] += weight
            chosen = max(live, key=lambda v: self._current[v])
            self._current[chosen] -= sum(live.values())
            return chosen

    def stop(self, version: str, reason: str) -> None:
        """``version`` takes no more traffic (until the config changes)."""
        with self._lock:
            self._stopped[version] = reason

    def shares(self, usable: Callable[[str], bool]) -> list[Share]:
        live = {v: w for v, w in self.weights.items() if v not in self._stopped and usable(v)}
        total = sum(live.values())
        return [
            Share(v, w, live.get(v, 0.0) / total if total else 0.0, self._stopped.get(v))
            for v, w in self.weights.items()
        ]
