"""The data position: a compact union of what every worker consumed (nanoray/position.py)."""

import random

from nanoray.position import StreamPosition


def test_position_is_a_compact_union():
    ids = [(slot, unit, row) for slot in range(4) for unit in range(3) for row in range(5)]
    random.Random(0).shuffle(ids)
    workers = [StreamPosition() for _ in range(3)]
    for i, (slot, unit, row) in enumerate(ids[:50]):
        workers[i % 3].add(slot, unit, [row], unit_rows=5, slot_units=3)
    merged = StreamPosition()
    for p in workers:
        merged = merged.merge(p)
    assert all(merged.consumed(*i) for i in ids[:50]) and not any(merged.consumed(*i) for i in ids[50:])
    assert StreamPosition.from_json(merged.to_json()) == merged
    for slot, unit, row in ids[50:]:
        merged.add(slot, unit, [row], unit_rows=5, slot_units=3)
    assert merged.to_json() == dict(done_slots=[[0, 4]], slots={})  # everything consumed: one range
