"""The room log's id scheme, shared by every back-end (embedded and Redis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securechat.store.roomlog import IdClock
from securechat.wire.ids import id_key


def test_ids_increase_even_when_the_clock_steps_back() -> None:
    clock = IdClock()
    ids = [clock.next(now)[0] for now in (100.0, 100.0, 99.0, 100.5, 100.5)]
    assert ids == ["100000-0", "100000-1", "100000-2", "100500-0", "100500-1"]
    assert sorted(ids, key=id_key) == ids


def test_a_clock_resumes_after_the_last_stored_id() -> None:
    clock = IdClock("5000-7")
    assert clock.next(4.0)[0] == "5000-8"


@pytest.mark.parametrize("bad", ["", "12", "-1", "1-", "a-1", "1-b", "1-2-3", "1 -2", "9" * 16 + "-0", "１-2"])
def test_anything_else_is_not_an_id(bad: str) -> None:
    with pytest.raises(ValueError):
        id_key(bad)


@given(st.integers(0, 10**14), st.integers(0, 10**14))
def test_ids_round_trip(ms: int, seq: int) -> None:
    assert id_key(f"{ms}-{seq}") == (ms, seq)
