"""RequestStore admission and idleness on a clock the test moves (no sleeping), and the bounded request records."""

from __future__ import annotations

import pytest

from exo_rknpu.errors import CapacityError, RequestStateError
from exo_rknpu.runtime.requests import BoundedMap, RequestLimits, RequestLog, RequestStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_idle_past_the_limit_is_reported_and_a_stepped_one_is_not():
    clock = Clock()
    store = RequestStore(RequestLimits(idle_seconds=30.0), clock=clock)
    store.admit("old")
    clock.now += 20.0
    store.admit("new")
    clock.now += 15.0  # old: 35 s without a step, new: 15 s
    assert store.idle() == ["old"]
    store.get("old")  # a step marks it used
    clock.now += 29.0
    assert store.idle() == ["new"]  # new: 44 s; old: 29 s
    assert store.peek("new") is not None and store.idle() == ["new"]  # peeking is not a step


def test_without_an_idle_limit_nothing_is_ever_idle():
    clock = Clock()
    store = RequestStore(RequestLimits(idle_seconds=None), clock=clock)
    store.admit("a")
    clock.now += 1e9
    assert store.idle() == []


def test_admission_refuses_past_either_bound_and_never_evicts():
    store = RequestStore(RequestLimits(max_requests=2, max_bytes=300), reserve_bytes=100, clock=Clock())
    store.admit("a")
    store.admit("b")
    with pytest.raises(CapacityError, match="--max-requests 2"):
        store.admit("c")
    assert store.ids() == ["a", "b"]
    tight = RequestStore(RequestLimits(max_requests=8, max_bytes=250), reserve_bytes=100, clock=Clock())
    tight.admit("a")
    tight.admit("b")
    with pytest.raises(CapacityError, match="over the budget"):
        tight.admit("c")
    with pytest.raises(RequestStateError, match="never reused"):
        tight.admit("a")
    with pytest.raises(RequestStateError, match="holds no KV cache"):
        tight.get("zzz")


def test_a_bounded_map_keeps_the_newest_keys_and_setting_a_key_renews_it():
    m: BoundedMap[str, int] = BoundedMap(3)
    for i, k in enumerate("abcd"):
        m[k] = i
    assert list(m) == ["b", "c", "d"]
    m["b"] = 9  # renewed: now the newest
    m["e"] = 5
    assert list(m.items()) == [("d", 3), ("b", 9), ("e", 5)]


def test_the_request_log_remembers_ends_and_takes_a_failure_once():
    log = RequestLog(limit=2)
    log.announce("r1")
    assert log.is_announced("r1")
    log.end("r1", "finished")
    assert not log.is_announced("r1") and log.why_ended("r1") == "finished"
    log.fail("r2", "capacity", "CapacityError: busy")
    assert log.take_failure("r2") == ("capacity", "CapacityError: busy") and log.take_failure("r2") is None
    for rid in ("r3", "r4"):
        log.end(rid, "cancelled")
    assert log.why_ended("r1") is None and log.why_ended("r4") == "cancelled"  # the oldest is forgotten
