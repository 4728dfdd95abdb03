"""The worker's tensor cache: a disk quota, least-recently-written eviction, pinned tensors kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from appliance.common.fnv import fnv1a64
from appliance.worker.cache import TensorCache, Wanted


def put(cache: TensorCache, data: bytes, *, age_s: float = 0.0) -> str:
    name = f"{fnv1a64(data):016x}"
    (cache.dir / name).write_bytes(data)
    t = time.time() - age_s
    os.utime(cache.dir / name, (t, t))
    return name


def test_over_quota_the_oldest_unpinned_tensors_go_first(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, quota_bytes=3000)
    old, mid, new = (put(cache, bytes([i]) * 1000, age_s=a) for i, a in ((1, 300), (2, 200), (3, 100)))
    cache.set_lists(version=1, need=frozenset({old}), want=())
    assert cache.make_room(1000)  # one must go: the oldest that is not pinned
    assert set(cache.files()) == {old, new}
    assert cache.used_bytes() + 1000 <= cache.quota_bytes


def test_pinned_tensors_are_never_evicted_and_staging_stops_instead(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, quota_bytes=2000)
    a, b = put(cache, b"a" * 1000), put(cache, b"b" * 1000)
    cache.set_lists(version=1, need=frozenset({a}), want=(Wanted(b, 1000), Wanted("0" * 16, 500)))
    assert not cache.make_room(500)
    assert set(cache.files()) == {a, b}
    report = cache.report()
    assert report.missing == ["0" * 16] and report.missing_bytes == 500


def test_a_staged_tensor_lands_only_if_its_bytes_hash_to_its_name(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, quota_bytes=1 << 20)
    data = os.urandom(4096)
    good = Wanted(f"{fnv1a64(data):016x}", len(data))
    part = cache.begin(good)
    part.write_bytes(data)
    assert cache.commit(good, part) and cache.has(good.hash, good.size)
    bad = Wanted(f"{fnv1a64(b'other'):016x}", len(data))
    part = cache.begin(bad)
    part.write_bytes(data)
    assert not cache.commit(bad, part) and not cache.has(bad.hash, bad.size)
    assert not list(cache.tmp.iterdir())  # nothing half-written is left behind


def test_leftovers_of_an_interrupted_staging_are_cleared_at_start(tmp_path: Path) -> None:
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "abc.part").write_bytes(b"x" * 10)
    TensorCache(tmp_path, quota_bytes=1 << 20)
    assert not list((tmp_path / ".staging").iterdir())
