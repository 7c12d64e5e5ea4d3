"""A scalable Bloom filter of transfer ids: "surely never seen" without reading LMDB.

Every new transfer must prove its id unused. Asking the journal's index costs a
read transaction, and py-lmdb releases the GIL inside it, which under load hands
the interpreter to another thread on every transfer. The filter answers "never
seen" for almost every new id from memory; only a "maybe" (a retry, or a false
positive, about 0.5% per layer) goes to the index, which stays the authority.

It is a *blocked* Bloom filter: an id's 4 probe bits all fall in one 64-bit word,
so checking and adding it is one word read, one mask test and one word write
(about a microsecond in Python, against five for 4 probes spread over the
layer). Each layer holds `capacity` ids at 16 bits per id; when full a
twice-as-large one is added, so memory is about 2 bytes per id ever used.
Not thread-safe: each claims stripe owns one and uses it under its lock.
"""

from __future__ import annotations

_BITS_PER_ID = 16
_WORD_BITS = 64
_CAPACITY_FIRST = 1 << 14


_PAIRS = [(1 << (pair & 63)) | (1 << (pair >> 6)) for pair in range(1 << 12)]
"""Two bit positions (6 bits each) to their mask: a table lookup is cheaper than shifting."""


def _probe(h: int) -> tuple[int, int]:
    """(word selector, mask of the 4 bits) of a hash: the selector from its low 32 bits,
    the bits from the next 24."""
    return h & 0xFFFFFFFF, _PAIRS[(h >> 32) & 0xFFF] | _PAIRS[(h >> 44) & 0xFFF]


class IdFilter:
    __slots__ = ("_layers", "_count", "_capacity", "_first")

    def __init__(self, expected: int = 0) -> None:
        """`expected`: how many ids it will hold soon (those journaled already): the first
        layer is made that large, so a ledger of a million ids checks one layer per id, not
        the seven that doubling from the smallest would have made."""
        self._layers: list[memoryview] = []
        """64-bit words (memoryview of format 'Q'), oldest first."""
        self._count = 0
        self._capacity = 0
        self._first = max(_CAPACITY_FIRST, expected)

    def _grow(self) -> None:
        capacity = max(self._first, self._capacity * 2)
        words = capacity * _BITS_PER_ID // _WORD_BITS
        self._layers.append(memoryview(bytearray(words * 8)).cast("Q"))
        self._capacity += capacity

    def add(self, h: int) -> None:
        """Add an id by its hash (any int: `hash(id_key)`)."""
        self.check_and_add(h)

    def add_all(self, hashes: list[int]) -> None:
        """`add` each of `hashes`, asking nothing back: no older layer is looked at (loading
        the ids journaled already, a million of them at open)."""
        pairs = _PAIRS
        done = 0
        while done < len(hashes):
            if self._count >= self._capacity:
                self._grow()
            room = self._capacity - self._count
            part = hashes[done : done + room] if done or room < len(hashes) else hashes
            words = self._layers[-1]
            size = len(words)
            for h in part:  # `_probe` and the write of `check_and_add`, inline
                i = (h & 0xFFFFFFFF) % size
                words[i] |= pairs[(h >> 32) & 0xFFF] | pairs[(h >> 44) & 0xFFF]
            self._count += len(part)
            done += len(part)

    def check_and_add(self, h: int) -> bool:
        """Add `h`; True if it may have been added before (`might_contain` first, in one pass)."""
        if self._count >= self._capacity:
            self._grow()  # first: the layer it closes is then checked like every older one
        selector, mask = h & 0xFFFFFFFF, _PAIRS[(h >> 32) & 0xFFF] | _PAIRS[(h >> 44) & 0xFFF]  # `_probe`, inline
        layers = self._layers
        words = layers[-1]
        i = selector % len(words)
        word = words[i]
        if word & mask == mask:
            return True
        words[i] = word | mask
        self._count += 1
        return len(layers) > 1 and _in_any(layers, selector, mask, len(layers) - 1)

    def might_contain(self, h: int) -> bool:
        """False only if the id was surely never added."""
        selector, mask = _probe(h)
        return _in_any(self._layers, selector, mask, len(self._layers))

    def __len__(self) -> int:
        return self._count


def _in_any(layers: list[memoryview], selector: int, mask: int, count: int) -> bool:
    """True if every probe bit is set in the word `selector` picks in some one of the first
    `count` of `layers` (a count, not a slice: no list made per id)."""
    for i in range(count):
        words = layers[i]
        if words[selector % len(words)] & mask == mask:
            return True
    return False
