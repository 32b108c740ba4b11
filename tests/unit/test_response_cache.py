"""The response cache's own contract: bounded bytes, LRU order, keys by model and scope."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from resnet_service.core.response_cache import ResponseCache


def probabilities(seed: int) -> npt.NDArray[np.float32]:
    p = np.random.default_rng(seed).random(1000).astype(np.float32)
    out: npt.NDArray[np.float32] = p / p.sum()
    return out


def test_memory_stays_within_its_bound_and_the_oldest_entry_goes_first() -> None:
    cache = ResponseCache(capacity_bytes=10 * 4_300, model_key="m")
    keys = [cache.key(str(i).encode()) for i in range(25)]
    for i, key in enumerate(keys):
        cache.put(key, probabilities(i))
        if i == 5:
            assert cache.get(keys[0]) is not None  # used: moves to the back of the line
    stats = cache.stats()
    assert stats.bytes <= stats.capacity_bytes
    assert stats.entries == 10
    assert cache.get(keys[-1]) is not None
    assert cache.get(keys[1]) is None  # evicted
    np.testing.assert_array_equal(cache.get(keys[-1]), probabilities(24))


def test_entries_are_read_only_copies() -> None:
    cache = ResponseCache(capacity_bytes=1 << 20, model_key="m")
    p = probabilities(0)
    key = cache.key(b"img")
    cache.put(key, p)
    p[:] = 0  # the caller's array changing later does not touch the entry
    got = cache.get(key)
    assert got is not None
    assert float(got.sum()) > 0.99
    assert not got.flags.writeable


def test_keys_differ_by_bytes_model_and_scope() -> None:
    a, b = ResponseCache(1 << 20, "model-a"), ResponseCache(1 << 20, "model-b")
    assert a.key(b"x") == a.key(b"x")
    assert len({a.key(b"x"), a.key(b"y"), b.key(b"x"), a.key(b"x", "token")}) == 4


def test_an_entry_larger_than_the_cache_is_not_kept() -> None:
    cache = ResponseCache(capacity_bytes=100, model_key="m")
    cache.put(cache.key(b"x"), probabilities(0))
    assert cache.stats().entries == 0
