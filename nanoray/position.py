"""Which rows of a token stream a run has consumed: the data position saved in every checkpoint.

The stream (nanoray/stream.py) names each row (slot, unit, row): slot s reads a shard, its units are the
shard's row groups, a unit packs into rows. A `StreamPosition` keeps what was consumed compactly, as ranges
of finished slots plus, per slot in flight, its finished units and the consumed rows of its units in flight.
Merging is a union, so the positions of any number of workers combine into one; a resumed run skips what
its position holds, whatever its number of workers.
"""




def _ranges_add(ranges: list[list[int]], value: int) -> None:
    """Insert `value` into sorted, disjoint, non-adjacent half-open ranges [a, b), merging neighbours."""
    i = 0
    while i < len(ranges) and ranges[i][1] < value:
        i += 1
    if i < len(ranges) and ranges[i][0] <= value < ranges[i][1]:
        return
    if i < len(ranges) and ranges[i][1] == value:
        ranges[i][1] += 1
        if i + 1 < len(ranges) and ranges[i + 1][0] == ranges[i][1]:
            ranges[i][1] = ranges.pop(i + 1)[1]
    elif i < len(ranges) and ranges[i][0] == value + 1:
        ranges[i][0] = value
    else:
        ranges.insert(i, [value, value + 1])


def in_ranges(ranges: list[list[int]], value: int) -> bool:
    return any(a <= value < b for a, b in ranges)


def _ranges_size(ranges: list[list[int]]) -> int:
    return sum(b - a for a, b in ranges)


class _Slot:
    """A slot in flight: its unit count, finished units, and the consumed rows (as ranges) of its units
    in flight."""

    def __init__(self, units: int, done=(), rows=None, unit_rows=None):
        self.units, self.done = units, set(done)
        self.rows: dict[int, list[list[int]]] = {int(u): [list(r) for r in rs] for u, rs in (rows or {}).items()}
        self.unit_rows: dict[int, int] = {int(u): n for u, n in (unit_rows or {}).items()}

    def add(self, unit: int, rows, unit_rows: int) -> None:
        if unit in self.done:
            return
        consumed = self.rows.setdefault(unit, [])
        for row in rows:
            _ranges_add(consumed, row)
        self.unit_rows[unit] = unit_rows
        if _ranges_size(consumed) == unit_rows:
            self.finish(unit)

    def finish(self, unit: int) -> None:
        self.rows.pop(unit, None)
        self.unit_rows.pop(unit, None)
        self.done.add(unit)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.units


class StreamPosition:
    """Which rows of a stream have been consumed, compact: finished slots as ranges, plus per slot in
    flight its finished units and the consumed rows of its units in flight. Merging is a union, so
    positions from any number of workers combine into one."""

    def __init__(self, done_slots: list[list[int]] | None = None, slots: dict | None = None):
        self.done_slots = [list(r) for r in done_slots or []]
        self.slots = {int(k): _Slot(**v) for k, v in (slots or {}).items()}

    def consumed(self, slot: int, unit: int, row: int) -> bool:
        if in_ranges(self.done_slots, slot):
            return True
        s = self.slots.get(slot)
        return s is not None and (unit in s.done or in_ranges(s.rows.get(unit, []), row))

    def add(self, slot: int, unit: int, rows, unit_rows: int, slot_units: int) -> None:
        """Record rows `rows` of (slot, unit) as consumed."""
        if in_ranges(self.done_slots, slot):
            return
        s = self.slots.setdefault(slot, _Slot(slot_units))
        s.add(unit, rows, unit_rows)
        self._close(slot)

    def _close(self, slot: int) -> None:
        if self.slots[slot].complete:
            del self.slots[slot]
            _ranges_add(self.done_slots, slot)

    def merge(self, other: "StreamPosition") -> "StreamPosition":
        """The union of two positions (what either has consumed), as a new position."""
        merged = StreamPosition.from_json(self.to_json())
        for a, b in other.done_slots:
            for slot in range(a, b):
                merged.slots.pop(slot, None)
                _ranges_add(merged.done_slots, slot)
        for slot, theirs in other.slots.items():
            if in_ranges(merged.done_slots, slot):
                continue
            mine = merged.slots.setdefault(slot, _Slot(theirs.units))
            for unit in theirs.done:
                mine.finish(unit)
            for unit, ranges in theirs.rows.items():
                mine.add(unit, (row for a, b in ranges for row in range(a, b)), theirs.unit_rows[unit])
            merged._close(slot)
        return merged

    def first_open_slot(self) -> int:
        return self.done_slots[0][1] if self.done_slots and self.done_slots[0][0] == 0 else 0

    def skip_table(self) -> dict[int, tuple[set[int], dict[int, set[int]]]]:
        """For each slot in flight: (finished units, consumed rows per unit in flight)."""
        return {slot: (set(s.done), {u: {row for a, b in r for row in range(a, b)} for u, r in s.rows.items()})
                for slot, s in self.slots.items()}

    def to_json(self) -> dict:
        return dict(done_slots=[list(r) for r in self.done_slots],
                    slots={str(slot): dict(units=s.units, done=sorted(s.done),
                                           rows={str(u): [list(r) for r in rs] for u, rs in sorted(s.rows.items())},
                                           unit_rows={str(u): n for u, n in sorted(s.unit_rows.items())})
                           for slot, s in sorted(self.slots.items())})

    @classmethod
    def from_json(cls, state: dict | None) -> "StreamPosition":
        state = state or {}
        return cls(state.get("done_slots"), state.get("slots"))

    def __eq__(self, other) -> bool:
        return isinstance(other, StreamPosition) and self.to_json() == other.to_json()
