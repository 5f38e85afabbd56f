"""Pure load-balancing strategies for one published port (no I/O, no asyncio).

A :class:`Balancer` holds the current backend list of a port (replaced with
:meth:`~Balancer.set_backends`) and chooses one backend per connection attempt
with :meth:`~Balancer.pick`. The caller (the proxy's route) has already removed
backends it tried for this connection or that are ejected, and passes the rest
as ``candidates``: a subsequence of the current list, in the same order. Every
strategy returns ``None`` for empty candidates and never returns a backend
that is not a candidate. :meth:`~Balancer.opened`/:meth:`~Balancer.closed`
report proxied connections starting and ending (only least-conn uses them).

Strategies (see :func:`make_balancer`):

``rr``
    Round-robin over the *full* backend list; a pointer walks the list and the
    first candidate at or after it is chosen, then the pointer moves past it.
    Non-candidates are skipped, so ejections and retries do not reshuffle the
    cycle for the others.
``random``
    Uniform over the candidates, from an injectable :class:`random.Random`.
``least-conn``
    Fewest active connections (``opened`` minus ``closed``); ties are broken
    round-robin: the scan starts just after the previous choice.
``source-hash``
    Rendezvous (highest-random-weight) hashing of the client IP: each backend,
    keyed by ``(addr, port)``, gets weight ``mix(H(client) ^ H(backend))``
    with a stable hash ``H`` (blake2b; never Python's salted ``hash()``), and
    the candidate with the highest weight wins. Removing a backend moves only
    its own clients; an ejected preferred backend falls to the candidate with
    the next-highest weight, which is also where its clients go if it is removed.
``maglev``
    Google's Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup
    table of prime size ``M`` (65537) filled by letting each backend, in turn,
    claim the next free slot of its own permutation ``(offset + j*skip) mod M``
    (offset and skip from two hashes of ``(addr, port)``). Each backend owns
    ``M/N`` slots (±1); a client is served by ``table[H(client) mod M]``, O(1)
    per pick. Backends are ordered by key before population, so the table does
    not depend on list order, and it is rebuilt only when the set of keys
    changes. If the chosen backend is not a candidate, the following table
    entries are tried in turn. Adding or removing one backend moves about
    ``1/N`` of clients (plus a small fraction the paper accepts for balance).

Affinity (``affinity_timeout``) wraps any strategy with client-IP stickiness:
the backend chosen for a client is remembered and reused while it is still a
candidate and was last used less than ``affinity_timeout`` seconds ago.
Entries are kept in least-recently-used order, expired ones are dropped lazily
from the old end on each pick, and the table is capped (100k entries by
default) by dropping the least recently used.

Contract note: ``candidates`` must be a subset of the current backends. As a
cheap fast path, rr and maglev treat candidates as "all backends" when the
lengths match; if a caller breaks the contract (no candidate is in the current list), the
strategies still return a candidate (the first) rather than refuse.
"""

from __future__ import annotations

import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Protocol

from corral.api.lb import LbKind
from corral.dataplane.proxy import Backend

__all__ = [
    "Affinity",
    "BalanceKind",
    "Balancer",
    "LeastConn",
    "Maglev",
    "RandomChoice",
    "RoundRobin",
    "SourceHash",
    "make_balancer",
    "stable_hash",
]

BalanceKind = LbKind  # the service spec's choice, one strategy each
KINDS: tuple[BalanceKind, ...] = ("rr", "random", "least-conn", "source-hash", "maglev")

MAGLEV_TABLE_SIZE = 65537  # prime, as in the paper's smaller table
AFFINITY_MAX_ENTRIES = 100_000

_MASK64 = (1 << 64) - 1


class Balancer(Protocol):
    """Chooses a backend per connection attempt for one published port."""

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace the backend list (affects later picks only)."""

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return one of ``candidates`` for the client IP ``client``, or None if empty."""

    def opened(self, backend: Backend) -> None:
        """A proxied connection to ``backend`` started."""

    def closed(self, backend: Backend) -> None:
        """A proxied connection to ``backend`` ended."""


def stable_hash(data: str, person: bytes = b"") -> int:
    """Return a 64-bit hash of ``data`` that is the same in every process."""
    return int.from_bytes(blake2b(data.encode(), digest_size=8, person=person).digest(), "little")


def _backend_hash(b: Backend) -> int:
    """Return the stable 64-bit hash of a backend's ``(addr, port)`` key."""
    return stable_hash(f"{b.addr}:{b.port}", b"corral-be")


def _client_hash(client: str) -> int:
    """Return the stable 64-bit hash of a client IP."""
    return stable_hash(client, b"corral-cl")


def _mix64(x: int) -> int:
    """Return the MurmurHash3 64-bit finalizer of ``x`` (a bijection with full avalanche)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    x ^= x >> 33
    return x


def _first_in(backends: tuple[Backend, ...], start: int, candidates: Sequence[Backend]) -> int:
    """Return the index of the first backend at or after ``start`` (cyclically) in ``candidates``, or -1."""
    n = len(backends)
    for i in range(n):
        j = (start + i) % n
        if backends[j] in candidates:
            return j
    return -1


class _NoConnCounts:
    """Mixin: a strategy that ignores connection open/close events."""

    __slots__ = ()

    def opened(self, backend: Backend) -> None:
        """Ignore: this strategy does not count connections."""

    def closed(self, backend: Backend) -> None:
        """Ignore: this strategy does not count connections."""


class RoundRobin(_NoConnCounts):
    """Round-robin over the full backend list, skipping non-candidates."""

    __slots__ = ("_backends", "_next")

    def __init__(self) -> None:
        """Create with no backends."""
        self._backends: tuple[Backend, ...] = ()
        self._next = 0

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace the backend list; the pointer is kept (modulo the new length)."""
        self._backends = tuple(backends)

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return the first candidate at or after the pointer and move the pointer past it."""
        if not candidates:
            return None
        backends = self._backends
        n = len(backends)
        if n == len(candidates):  # nothing excluded (candidates ⊆ backends)
            i = self._next % n
            self._next = i + 1
            return backends[i]
        i = _first_in(backends, self._next % n, candidates) if n else -1
        if i < 0:  # contract broken: candidates not in the current list
            return candidates[0]
        self._next = i + 1
        return backends[i]


class RandomChoice(_NoConnCounts):
    """Uniformly random among the candidates."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        """Create with ``rng`` (a fresh unseeded one if None)."""
        self._rng = rng if rng is not None else random.Random()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Nothing to do: only the candidates matter."""

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return a uniformly random candidate."""
        if not candidates:
            return None
        return candidates[self._rng.randrange(len(candidates))]


class LeastConn:
    """Fewest active connections, ties broken round-robin."""

    __slots__ = ("_active", "_rot")

    def __init__(self) -> None:
        """Create with no connections counted."""
        # Backend -> open connections; only nonzero counts are stored, so the
        # dict stays bounded by the number of backends with live connections.
        # Counts survive set_backends(): connections to a removed backend are
        # still open, and count again if it is re-added.
        self._active: dict[Backend, int] = {}
        self._rot = 0

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Nothing to rebuild: counts are kept per backend."""

    def active(self, backend: Backend) -> int:
        """Return the number of open connections to ``backend``."""
        return self._active.get(backend, 0)

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return the candidate with the fewest open connections (ties rotate)."""
        k = len(candidates)
        if not k:
            return None
        active = self._active
        start = self._rot % k
        best = candidates[start]
        if not active:
            self._rot = start + 1
            return best
        least = active.get(best, 0)
        at = start
        for i in range(1, k):
            if not least:
                break
            j = start + i
            if j >= k:
                j -= k
            c = candidates[j]
            n = active.get(c, 0)
            if n < least:
                best, least, at = c, n, j
        # Resume after the chosen one, so tied backends take turns.
        self._rot = at + 1
        return best

    def opened(self, backend: Backend) -> None:
        """Count one more open connection to ``backend``."""
        self._active[backend] = self._active.get(backend, 0) + 1

    def closed(self, backend: Backend) -> None:
        """Count one fewer open connection to ``backend`` (never below zero)."""
        n = self._active.get(backend, 0)
        if n > 1:
            self._active[backend] = n - 1
        elif n == 1:
            del self._active[backend]


class SourceHash(_NoConnCounts):
    """Rendezvous (HRW) hashing of the client IP over backends keyed by (addr, port)."""

    __slots__ = ("_hashes",)

    def __init__(self) -> None:
        """Create with no backends."""
        self._hashes: dict[Backend, int] = {}

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Cache the stable hash of each backend's key."""
        old = self._hashes
        self._hashes = {b: old[b] if b in old else _backend_hash(b) for b in backends}

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return the candidate with the highest rendezvous weight for ``client``."""
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        ch = _client_hash(client)
        hashes = self._hashes
        best = candidates[0]
        top = -1
        for c in candidates:
            h = hashes.get(c)
            if h is None:  # not in the current list (contract broken): still rank it
                h = _backend_hash(c)
            w = _mix64(ch ^ h)
            if w > top:
                best, top = c, w
        return best


def _maglev_populate(keys: Sequence[str], m: int) -> array[int]:
    """Return the Maglev table of size ``m``: slot -> index into ``keys``."""
    n = len(keys)
    table = array("i", [-1]) * m
    if not n:
        return table
    offsets: list[int] = []
    skips: list[int] = []
    for key in keys:
        digest = blake2b(key.encode(), digest_size=16, person=b"corral-maglev").digest()
        offsets.append(int.from_bytes(digest[:8], "little") % m)
        skips.append(int.from_bytes(digest[8:], "little") % (m - 1) + 1)
    pos = offsets  # next slot of each backend's permutation to try
    filled = 0
    while True:
        for i in range(n):
            c = pos[i]
            s = skips[i]
            while table[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            table[c] = i
            c += s
            if c >= m:
                c -= m
            pos[i] = c
            filled += 1
            if filled == m:
                return table


def _is_prime(n: int) -> bool:
    """Return whether ``n`` is prime (trial division; for table sizes)."""
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


class Maglev(_NoConnCounts):
    """Maglev consistent hashing: a prime-size lookup table, O(1) per pick."""

    __slots__ = ("_keys", "_members", "_table", "_size", "_index")

    def __init__(self, table_size: int = MAGLEV_TABLE_SIZE) -> None:
        """Create with no backends; ``table_size`` must be a prime (≫ backend count)."""
        if not _is_prime(table_size):
            raise ValueError(f"maglev table size must be prime, got {table_size}")
        self._size = table_size
        self._keys: tuple[str, ...] = ()
        # Backends ordered by key (one per key); the table holds indexes into it.
        self._members: tuple[Backend, ...] = ()
        self._table: array[int] = array("i")
        # Backend -> index in _members, for the fallback scan.
        self._index: dict[Backend, int] = {}

    @property
    def table_size(self) -> int:
        """Return the lookup table's size M."""
        return self._size

    def slots(self) -> dict[Backend, int]:
        """Return how many table slots each backend owns (for tests and stats)."""
        counts = dict.fromkeys(self._members, 0)
        for i in self._table:
            counts[self._members[i]] += 1
        return counts

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace the backend list, rebuilding the table only if the set of keys changed."""
        by_key: dict[str, Backend] = {}
        for b in backends:
            by_key.setdefault(f"{b.addr}:{b.port}", b)  # first wins on duplicate keys
        keys = tuple(sorted(by_key))
        members = tuple(by_key[k] for k in keys)
        if keys != self._keys:
            self._table = _maglev_populate(keys, self._size)
            self._keys = keys
        # Same keys may come with new Backend objects (e.g. another task_id).
        self._members = members
        self._index = {b: i for i, b in enumerate(members)}

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return the table's backend for ``client``, or the next table entry that is a candidate."""
        if not candidates:
            return None
        members = self._members
        if not members:
            return candidates[0]  # contract broken: no current backends
        table = self._table
        m = self._size
        slot = _client_hash(client) % m
        b = members[table[slot]]
        if len(candidates) == len(members) or b in candidates:
            return b
        # Fallback: walk the following entries. Each backend owns ~M/N slots spread
        # evenly, so a candidate is found within a few steps on average.
        wanted = bytearray(len(members))
        index = self._index
        for c in candidates:
            i = index.get(c)
            if i is not None:
                wanted[i] = 1
        if not any(wanted):
            return candidates[0]  # contract broken: no candidate is a current backend
        while True:
            slot += 1
            if slot == m:
                slot = 0
            i = table[slot]
            if wanted[i]:
                return members[i]


class Affinity:
    """Client-IP stickiness around another strategy, for ``timeout`` seconds since last use."""

    __slots__ = ("inner", "timeout", "max_entries", "_clock", "_table")

    def __init__(
        self,
        inner: Balancer,
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = AFFINITY_MAX_ENTRIES,
    ) -> None:
        """Wrap ``inner``; entries idle for ``timeout`` seconds expire, at most ``max_entries`` kept."""
        if not timeout > 0:
            raise ValueError(f"affinity timeout must be > 0, got {timeout}")
        if max_entries < 1:
            raise ValueError(f"affinity max_entries must be >= 1, got {max_entries}")
        self.inner = inner
        self.timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        # client -> (backend, last use), least recently used first.
        self._table: OrderedDict[str, tuple[Backend, float]] = OrderedDict()

    def __len__(self) -> int:
        """Return the number of remembered clients (expired ones may linger until a pick)."""
        return len(self._table)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Pass the list on; stale entries are skipped lazily on pick."""
        self.inner.set_backends(backends)

    def pick(self, client: str, candidates: Sequence[Backend]) -> Backend | None:
        """Return the client's remembered backend if still a candidate, else the inner choice."""
        if not candidates:
            return None
        now = self._clock()
        table = self._table
        deadline = now - self.timeout
        # Lazy expiry from the least recently used end: amortized O(1) per pick.
        while table:
            first = next(iter(table.values()))
            if first[1] > deadline:
                break
            table.popitem(last=False)
        entry = table.get(client)
        if entry is not None and entry[0] in candidates:
            chosen = entry[0]
        else:
            picked = self.inner.pick(client, candidates)
            if picked is None:
                return None
            chosen = picked
        table[client] = (chosen, now)
        table.move_to_end(client)
        if len(table) > self.max_entries:
            table.popitem(last=False)
        return chosen

    def opened(self, backend: Backend) -> None:
        """Pass on to the wrapped strategy."""
        self.inner.opened(backend)

    def closed(self, backend: Backend) -> None:
        """Pass on to the wrapped strategy."""
        self.inner.closed(backend)


def make_balancer(
    kind: BalanceKind,
    affinity_timeout: float | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Balancer:
    """Return a new balancer of ``kind``, wrapped in client-IP affinity if ``affinity_timeout`` is set."""
    inner: Balancer
    if kind == "rr":
        inner = RoundRobin()
    elif kind == "random":
        inner = RandomChoice(rng)
    elif kind == "least-conn":
        inner = LeastConn()
    elif kind == "source-hash":
        inner = SourceHash()
    elif kind == "maglev":
        inner = Maglev()
    else:
        raise ValueError(f"unknown balancing strategy {kind!r} (expected one of {', '.join(KINDS)})")
    if affinity_timeout is None:
        return inner
    return Affinity(inner, affinity_timeout, clock=clock)
