"""A scalable Bloom filter of transfer ids: "surely never seen" without reading LMDB.

Every new transfer must prove its id unused. Asking the journal's index costs a
read transaction, and py-lmdb releases the GIL inside it, which under load hands
the interpreter to another thread on every transfer. The filter answers "never
seen" for almost every new id from memory; only a "maybe" (a retry, or a false
positive at about 0.2%) goes to the index, which stays the authority.

Each filter holds `capacity` ids at 16 bits per id and 4 probes; when full a
twice-as-large one is added, so memory is about 2 bytes per id ever used.
Not thread-safe: each claims stripe owns one and uses it under its lock.
"""

from __future__ import annotations

_BITS_PER_ID = 16
_PROBES = 4
_CAPACITY_FIRST = 1 << 14


class IdFilter:
    __slots__ = ("_layers", "_count", "_capacity")

    def __init__(self) -> None:
        self._layers: list[tuple[bytearray, int]] = []
        self._count = 0
        self._capacity = 0

    def _grow(self) -> None:
        capacity = max(_CAPACITY_FIRST, self._capacity * 2)
        bits = capacity * _BITS_PER_ID
        self._layers.append((bytearray(bits // 8), bits))
        self._capacity += capacity

    def add(self, h: int) -> None:
        """Add an id by its hash (any int: `hash(id_key)`)."""
        self.check_and_add(h)

    def check_and_add(self, h: int) -> bool:
        """Add `h`; True if it may have been added before (`might_contain` first, in one pass)."""
        if self._count >= self._capacity:
            self._grow()  # first: the layer it closes is then checked like every older one
        h1 = h & 0xFFFFFFFF
        h2 = ((h >> 32) & 0xFFFFFFFF) | 1
        seen = _in_any(self._layers[:-1], h1, h2)
        bits, size = self._layers[-1]
        new = False
        for probe in range(_PROBES):
            position = (h1 + probe * h2) % size
            mask = 1 << (position & 7)
            if not bits[position >> 3] & mask:
                new = True
                bits[position >> 3] |= mask
        if new:
            self._count += 1
        return seen or not new

    def might_contain(self, h: int) -> bool:
        """False only if the id was surely never added."""
        return _in_any(self._layers, h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1)

    def __len__(self) -> int:
        return self._count


def _in_any(layers: list[tuple[bytearray, int]], h1: int, h2: int) -> bool:
    """True if every probe of (h1, h2) is set in some one of `layers`."""
    for bits, size in layers:
        for probe in range(_PROBES):
            position = (h1 + probe * h2) % size
            if not bits[position >> 3] & (1 << (position & 7)):
                break
        else:
            return True
    return False
