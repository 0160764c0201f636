"""Slot memory in pages: adapters take the pages their rank needs, LRU eviction frees as many adapters
as a new one needs (and none if that cannot be enough), pins protect, a reload may resize in place."""

from __future__ import annotations

import pytest

from server.lora.slot_table import SlotTable


def test_small_adapters_share_the_pages_one_large_one_takes():
    table = SlotTable(num_slots=8, num_pages=8)
    placed = {key: table.assign(key, 1, keep=set())[0] for key in "abcdefgh"}  # eight rank <= 16 adapters
    assert len({w.slot for w in placed.values()}) == 8 and sorted(
        p for w in placed.values() for p in w.pages
    ) == list(range(8))
    table.lookup("a")  # a is the most recently used
    where, evicted = table.assign("big", 4, keep={"c"})  # rank 64: the 4 least recent but c and a
    assert [key for key, _ in evicted] == ["b", "d", "e", "f"]
    assert sorted(where.pages) == sorted(p for _, w in evicted for p in w.pages)
    assert table.resident() == sorted(["a", "c", "g", "h", "big"])


def test_nothing_is_evicted_when_the_room_cannot_be_made():
    table = SlotTable(num_slots=4, num_pages=4)
    table.assign("a", 2, keep=set())
    table.assign("b", 1, keep=set())
    table.pin("a")
    assert not table.has_room(set(), 4) and table.has_room(set(), 2)
    with pytest.raises(RuntimeError, match="no LoRA slot memory"):
        table.assign("c", 4, keep=set())
    assert table.resident() == ["a", "b"]  # b was not evicted for nothing


def test_fits_counts_resident_pages_and_the_needs_of_the_others():
    table = SlotTable(num_slots=4, num_pages=4)
    table.assign("a", 3, keep=set())
    table.pin("a")
    table.pin("p")  # scheduled, not yet activated: its need counts too
    assert table.fits({"a"}, need=lambda k: 1)
    assert not table.fits({"x"}, need=lambda k: 1)  # a 3 + p 1 + x 1 > 4
    assert table.fits(set(), need=lambda k: 1) and not table.fits(set(), need=lambda k: 2)


def test_fits_counts_a_reloaded_resident_key_at_its_new_need():
    table = SlotTable(num_slots=8, num_pages=8)
    table.assign("k", 1, keep=set())
    for key in "abcdefg":
        table.assign(key, 1, keep=set())
        table.pin(key)
    assert table.fits({"k"}, need=lambda k: 4)  # resident: its pages, whatever its need
    assert not table.fits({"k"}, need=lambda k: 4, refill={"k"})  # reloaded at rank 64: 4 pages
    with pytest.raises(RuntimeError):
        table.place("k", 4, keep={"k"}, spare=set())
    assert table.lookup("k").pages == (0,)  # nothing changed


def test_resize_keeps_the_slot_and_its_first_pages():
    table = SlotTable(num_slots=4, num_pages=6)
    first, _ = table.assign("a", 2, keep=set())
    table.assign("b", 3, keep=set())
    grown, evicted = table.resize("a", 4, keep=set())  # needs 2 more: 1 free, then b goes
    assert grown.slot == first.slot and grown.pages[:2] == first.pages and [k for k, _ in evicted] == ["b"]
    shrunk, evicted = table.resize("a", 1, keep=set())
    assert shrunk.pages == first.pages[:1] and not evicted
    assert table.has_room(set(), 5)  # the rest are free again
