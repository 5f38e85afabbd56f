"""Balancing strategies: rr, random, least-conn, source-hash, maglev, and client affinity."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest

from corral.dataplane.balance import (
    KINDS,
    Affinity,
    BalanceKind,
    Balancer,
    LeastConn,
    Maglev,
    RandomChoice,
    RoundRobin,
    SourceHash,
    make_balancer,
    stable_hash,
)
from corral.dataplane.proxy import Backend

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

A, B, C, D = (Backend(f"10.0.0.{i}", 8080, f"task{i}") for i in (1, 2, 3, 4))
ABC = [A, B, C]
CLIENTS = [f"192.168.{i // 256}.{i % 256}" for i in range(10_000)]
SMALL_PRIME = 1009  # maglev table size for the many-example property tests


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def balancer(kind: BalanceKind, backends: Sequence[Backend], **kw: object) -> Balancer:
    """Return a balancer of ``kind`` (seeded when random) with ``backends`` set."""
    bal = make_balancer(kind, rng=random.Random(7), **kw)  # type: ignore[arg-type]
    bal.set_backends(backends)
    return bal


def mapping(bal: Balancer, candidates: Sequence[Backend], clients: Sequence[str] = CLIENTS) -> dict[str, Backend | None]:
    """Return client -> picked backend for every client."""
    return {c: bal.pick(c, candidates) for c in clients}


# --- common to all strategies ---------------------------------------------------


@pytest.mark.parametrize("affinity", [None, 30.0])
@pytest.mark.parametrize("kind", KINDS)
def test_empty_candidates_give_none(kind: BalanceKind, affinity: float | None) -> None:
    bal = balancer(kind, ABC, affinity_timeout=affinity)
    assert bal.pick("1.2.3.4", []) is None
    assert bal.pick("1.2.3.4", ()) is None
    empty = balancer(kind, [], affinity_timeout=affinity)
    assert empty.pick("1.2.3.4", []) is None


@pytest.mark.parametrize("kind", KINDS)
def test_single_candidate_is_chosen(kind: BalanceKind) -> None:
    bal = balancer(kind, ABC)
    for cand in ABC:
        assert all(bal.pick(f"10.1.0.{i}", [cand]) == cand for i in range(20))


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("rr", RoundRobin), ("random", RandomChoice), ("least-conn", LeastConn),
     ("source-hash", SourceHash), ("maglev", Maglev)],
)
def test_make_balancer_kinds(kind: BalanceKind, cls: type) -> None:
    assert isinstance(make_balancer(kind), cls)
    wrapped = make_balancer(kind, 10.0)
    assert isinstance(wrapped, Affinity) and isinstance(wrapped.inner, cls)


@pytest.mark.parametrize("bad", [{"kind": "weighted"}, {"kind": "rr", "affinity_timeout": 0.0},
                                 {"kind": "rr", "affinity_timeout": -1.0}])
def test_make_balancer_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_balancer(**bad)  # type: ignore[arg-type]


def test_stable_hash_is_fixed() -> None:
    # Not Python's salted hash(): the same value in every process, on every node.
    assert stable_hash("10.0.0.1") == 16574176683607101011
    assert stable_hash("10.0.0.1", b"corral-cl") == 8541722999892683414


# --- round-robin ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # every pick sees all backends: a plain cycle
        ([ABC] * 7, [A, B, C, A, B, C, A]),
        # B excluded once: C is taken, and the cycle goes on from there (A next)
        ([ABC, [A, C], ABC, ABC, ABC], [A, C, A, B, C]),
        # a connection's retries (tried removed) continue the cycle
        ([ABC, [B, C], [C], ABC], [A, B, C, A]),
        # B ejected for a while: A, C alternate in list order; B comes back in its place
        ([[A, C]] * 4 + [ABC] * 3, [A, C, A, C, A, B, C]),
        # wrap-around: only A left after the pointer passed it
        ([ABC, ABC, [A]], [A, B, A]),
    ],
)
def test_rr_cycles_and_skips(steps: list[list[Backend]], expected: list[Backend]) -> None:
    bal = balancer("rr", ABC)
    assert [bal.pick("c", cand) for cand in steps] == expected


def test_rr_keeps_pointer_across_set_backends() -> None:
    bal = balancer("rr", ABC)
    assert [bal.pick("c", ABC) for _ in range(2)] == [A, B]
    bal.set_backends([A, B, C, D])
    assert [bal.pick("c", [A, B, C, D]) for _ in range(4)] == [C, D, A, B]


def test_rr_contract_broken_still_returns_a_candidate() -> None:
    bal = balancer("rr", [A, B])
    assert bal.pick("c", [C]) == C


# --- random -----------------------------------------------------------------------


def test_random_covers_candidates_and_is_seeded() -> None:
    bal = balancer("random", [A, B, C, D])
    picks = [bal.pick("c", [A, C, D]) for _ in range(600)]
    counts = Counter(picks)
    assert set(counts) == {A, C, D}
    assert all(150 <= n <= 250 for n in counts.values()), counts
    again = balancer("random", [A, B, C, D])
    assert [again.pick("c", [A, C, D]) for _ in range(600)] == picks


# --- least-conn ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conns", "candidates", "expected"),
    [
        ({A: 2, B: 0, C: 1}, ABC, B),
        ({A: 2, B: 3, C: 1}, ABC, C),
        ({A: 2, B: 3, C: 1}, [A, B], A),  # the emptiest is not a candidate
        ({A: 5, B: 5, C: 0}, [A, B, C], C),
    ],
)
def test_least_conn_prefers_emptiest(conns: dict[Backend, int], candidates: list[Backend], expected: Backend) -> None:
    bal = balancer("least-conn", ABC)
    for b, n in conns.items():
        for _ in range(n):
            bal.opened(b)
    assert all(bal.pick("c", candidates) == expected for _ in range(5))


def test_least_conn_ties_rotate() -> None:
    bal = balancer("least-conn", ABC)
    assert Counter(bal.pick("c", ABC) for _ in range(30)) == {A: 10, B: 10, C: 10}
    bal.opened(A)
    assert Counter(bal.pick("c", ABC) for _ in range(30)) == {B: 15, C: 15}


def test_least_conn_balances_open_connections() -> None:
    bal = balancer("least-conn", ABC)
    for _ in range(30):
        b = bal.pick("c", ABC)
        assert b is not None
        bal.opened(b)
    lc = bal
    assert isinstance(lc, LeastConn)
    assert [lc.active(b) for b in ABC] == [10, 10, 10]
    for _ in range(4):
        lc.closed(B)
    assert [bal.pick("c", ABC) for _ in range(3)] == [B, B, B]


def test_least_conn_close_never_negative() -> None:
    bal = LeastConn()
    bal.set_backends(ABC)
    bal.closed(A)  # a close without an open (e.g. counted before a restart): ignored
    bal.opened(A)
    bal.closed(A)
    bal.closed(A)
    assert bal.active(A) == 0
    bal.opened(B)
    assert bal.pick("c", [A, B]) == A


# --- consistent hashing: source-hash and maglev -----------------------------------------


HASHERS: list[BalanceKind] = ["source-hash", "maglev"]


@pytest.mark.parametrize("kind", HASHERS)
def test_hash_same_client_same_backend(kind: BalanceKind) -> None:
    bal = balancer(kind, ABC)
    first = mapping(bal, ABC, CLIENTS[:500])
    assert mapping(bal, ABC, CLIENTS[:500]) == first
    # a fresh balancer (another node of the swarm) agrees, and list order does not matter
    other = balancer(kind, [C, A, B])
    assert mapping(other, [C, A, B], CLIENTS[:500]) == first


@pytest.mark.parametrize("kind", HASHERS)
def test_hash_spreads_clients(kind: BalanceKind) -> None:
    bal = balancer(kind, ABC)
    counts = Counter(mapping(bal, ABC).values())
    assert set(counts) == set(ABC)
    assert all(0.20 * len(CLIENTS) <= n <= 0.50 * len(CLIENTS) for n in counts.values()), counts


@pytest.mark.parametrize(("kind", "slack"), [("source-hash", 0.0), ("maglev", 0.02)])
@pytest.mark.parametrize("removed", ABC)
def test_hash_removal_moves_only_its_clients(kind: BalanceKind, slack: float, removed: Backend) -> None:
    bal = balancer(kind, ABC)
    before = mapping(bal, ABC)
    rest = [b for b in ABC if b != removed]
    bal.set_backends(rest)
    after = mapping(bal, rest)
    assert all(after[c] != removed for c in CLIENTS)
    assert all(after[c] != before[c] for c in CLIENTS if before[c] == removed)
    others_moved = sum(before[c] != after[c] for c in CLIENTS if before[c] != removed)
    assert others_moved <= slack * len(CLIENTS)
    # about 1/N of all clients moved
    assert sum(before[c] != after[c] for c in CLIENTS) <= 0.40 * len(CLIENTS)


@pytest.mark.parametrize(("kind", "slack"), [("source-hash", 0.0), ("maglev", 0.02)])
def test_hash_addition_moves_about_one_in_n(kind: BalanceKind, slack: float) -> None:
    bal = balancer(kind, ABC)
    before = mapping(bal, ABC)
    bal.set_backends([A, B, C, D])
    after = mapping(bal, [A, B, C, D])
    moved_to_d = sum(after[c] == D for c in CLIENTS)
    assert 0.15 * len(CLIENTS) <= moved_to_d <= 0.35 * len(CLIENTS)
    others = sum(before[c] != after[c] for c in CLIENTS if after[c] != D)
    assert others <= slack * len(CLIENTS)


@pytest.mark.parametrize("kind", HASHERS)
def test_hash_non_candidate_falls_back_consistently(kind: BalanceKind) -> None:
    bal = balancer(kind, ABC)
    before = mapping(bal, ABC, CLIENTS[:2000])
    ejected = mapping(bal, [A, C], CLIENTS[:2000])
    # clients of A and C stay put; B's clients go elsewhere, the same way every time,
    # and spread over both survivors
    assert all(ejected[c] == before[c] for c in ejected if before[c] != B)
    b_clients = [c for c in ejected if before[c] == B]
    assert mapping(bal, [A, C], b_clients) == {c: ejected[c] for c in b_clients}
    assert set(ejected[c] for c in b_clients) == {A, C}


def test_source_hash_fallback_matches_removal() -> None:
    # HRW: a non-candidate's clients go exactly where they would if it were removed.
    bal = balancer("source-hash", ABC)
    ejected = mapping(bal, [A, C])
    bal.set_backends([A, C])
    assert mapping(bal, [A, C]) == ejected


def test_source_hash_keys_on_addr_port_not_task() -> None:
    bal = balancer("source-hash", ABC)
    before = mapping(bal, ABC, CLIENTS[:500])
    renamed = [Backend(b.addr, b.port, "other") for b in ABC]
    bal.set_backends(renamed)
    after = mapping(bal, renamed, CLIENTS[:500])
    assert all((before[c].addr, before[c].port) == (after[c].addr, after[c].port)  # type: ignore[union-attr]
               for c in CLIENTS[:500])


# --- maglev specifics ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 64])
def test_maglev_table_population_balanced(n: int) -> None:
    m = Maglev()
    backends = [Backend(f"10.0.{i // 250}.{i % 250}", 80) for i in range(n)]
    m.set_backends(backends)
    slots = m.slots()
    assert sum(slots.values()) == m.table_size == 65537
    assert set(slots) == set(backends)
    assert all(abs(k - m.table_size / n) <= 1 for k in slots.values()), slots


def test_maglev_rebuilds_only_when_keys_change() -> None:
    m = Maglev()
    m.set_backends(ABC)
    table = m._table
    m.set_backends([C, B, A])  # same keys, other order
    assert m._table is table
    renamed = [Backend(b.addr, b.port, "new") for b in ABC]
    m.set_backends(renamed)  # same keys, new task ids: no rebuild, new objects returned
    assert m._table is table
    assert m.pick("1.2.3.4", renamed) in renamed
    m.set_backends([A, B])
    assert m._table is not table


def test_maglev_rejects_non_prime_size() -> None:
    with pytest.raises(ValueError):
        Maglev(table_size=65536)


def test_maglev_duplicate_keys_and_broken_contract() -> None:
    m = Maglev(table_size=SMALL_PRIME)
    m.set_backends([A, Backend(A.addr, A.port, "dup"), B])
    assert sum(m.slots().values()) == SMALL_PRIME and len(m.slots()) == 2
    assert m.pick("c", [D]) == D  # no current backend among candidates: still a candidate
    empty = Maglev(table_size=SMALL_PRIME)
    assert empty.pick("c", [D]) == D


# --- affinity -----------------------------------------------------------------------


def test_affinity_sticky_within_timeout_then_expires() -> None:
    clock = FakeClock()
    bal = make_balancer("rr", 10.0, clock=clock)
    bal.set_backends(ABC)
    assert bal.pick("1.1.1.1", ABC) == A
    assert bal.pick("2.2.2.2", ABC) == B
    for _ in range(5):  # rr alone would rotate; each use refreshes the entry
        clock.now += 9.0
        assert bal.pick("1.1.1.1", ABC) == A
    clock.now += 10.0  # idle for the whole timeout: forgotten
    assert bal.pick("1.1.1.1", ABC) == C


def test_affinity_falls_through_when_backend_not_candidate() -> None:
    clock = FakeClock()
    bal = make_balancer("rr", 60.0, clock=clock)
    bal.set_backends(ABC)
    assert bal.pick("1.1.1.1", ABC) == A
    assert bal.pick("1.1.1.1", [B, C]) == B  # A ejected / already tried
    assert bal.pick("1.1.1.1", ABC) == B  # the new choice is now the sticky one
    bal.set_backends([A, C])  # B removed
    again = bal.pick("1.1.1.1", [A, C])
    assert again in (A, C)
    assert [bal.pick("1.1.1.1", [A, C]) for _ in range(3)] == [again] * 3


def test_affinity_expiry_is_lazy_and_bounded() -> None:
    clock = FakeClock()
    inner = RoundRobin()
    bal = Affinity(inner, 5.0, clock=clock, max_entries=100)
    bal.set_backends(ABC)
    for i in range(250):
        bal.pick(f"10.9.{i // 256}.{i % 256}", ABC)
    assert len(bal) == 100  # capped: the least recently used were dropped
    clock.now += 6.0
    bal.pick("1.1.1.1", ABC)
    assert len(bal) == 1  # expired entries dropped on the next pick


def test_affinity_cap_drops_least_recently_used() -> None:
    clock = FakeClock()
    bal = Affinity(RoundRobin(), 60.0, clock=clock, max_entries=2)
    bal.set_backends(ABC)
    assert bal.pick("x", ABC) == A
    assert bal.pick("y", ABC) == B
    assert bal.pick("x", ABC) == A  # x is now the most recently used
    assert bal.pick("z", ABC) == C  # evicts y
    assert bal.pick("x", ABC) == A
    assert bal.pick("y", ABC) == A  # y was forgotten: a fresh rr pick


def test_affinity_passes_connection_events() -> None:
    bal = make_balancer("least-conn", 60.0, clock=FakeClock())
    bal.set_backends(ABC)
    bal.opened(A)
    bal.opened(B)
    assert bal.pick("1.1.1.1", ABC) == C
    assert isinstance(bal, Affinity) and isinstance(bal.inner, LeastConn)
    bal.closed(A)
    assert bal.inner.active(A) == 0


# --- properties (hypothesis) --------------------------------------------------------------


def _backend_lists() -> SearchStrategy[list[Backend]]:
    """Return a hypothesis strategy of backend lists with distinct keys."""
    from hypothesis import strategies as st

    return st.lists(st.integers(0, 40), min_size=0, max_size=8, unique=True).map(
        lambda ports: [Backend("10.0.0.1", 9000 + p) for p in ports]
    )


def _make(kind: BalanceKind, affinity: float | None) -> Balancer:
    if kind == "maglev":
        inner: Balancer = Maglev(table_size=SMALL_PRIME)
        return inner if affinity is None else Affinity(inner, affinity, clock=FakeClock())
    return make_balancer(kind, affinity, rng=random.Random(1), clock=FakeClock())


@pytest.mark.parametrize("affinity", [None, 5.0])
@pytest.mark.parametrize("kind", KINDS)
def test_property_pick_is_a_candidate(kind: BalanceKind, affinity: float | None) -> None:
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(backends=_backend_lists(), data=st.data())
    def prop(backends: list[Backend], data: st.DataObject) -> None:
        bal = _make(kind, affinity)
        bal.set_backends(backends)
        for _ in range(5):
            mask = data.draw(st.lists(st.booleans(), min_size=len(backends), max_size=len(backends)))
            cand = [b for b, keep in zip(backends, mask) if keep]
            client = data.draw(st.sampled_from(["1.1.1.1", "2.2.2.2", "::1", "10.0.0.9"]))
            got = bal.pick(client, cand)
            if cand:
                assert got in cand
                bal.opened(got)
            else:
                assert got is None

    prop()


@pytest.mark.parametrize("kind", HASHERS)
def test_property_removal_only_moves_removed_clients(kind: BalanceKind) -> None:
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    clients = CLIENTS[:300]

    @settings(max_examples=40, deadline=None)
    @given(backends=_backend_lists().filter(lambda bs: len(bs) >= 2), data=st.data())
    def prop(backends: list[Backend], data: st.DataObject) -> None:
        bal = _make(kind, None)
        bal.set_backends(backends)
        before = mapping(bal, backends, clients)
        removed = data.draw(st.sampled_from(backends))
        rest = [b for b in backends if b != removed]
        bal.set_backends(rest)
        after = mapping(bal, rest, clients)
        moved_others = sum(after[c] != before[c] for c in clients if before[c] != removed)
        # HRW is exact; maglev may move a few others (more with a small table and many backends)
        assert moved_others <= (0 if kind == "source-hash" else 0.1 * len(clients))
        assert all(after[c] in rest for c in clients)

    prop()


def test_property_rr_cycle_unshuffled_by_exclusions() -> None:
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=50, deadline=None)
    @given(backends=_backend_lists().filter(bool), data=st.data())
    def prop(backends: list[Backend], data: st.DataObject) -> None:
        bal = RoundRobin()
        bal.set_backends(backends)
        n = len(backends)
        pos = 0
        for _ in range(10):
            mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
            cand = [b for b, keep in zip(backends, mask) if keep]
            got = bal.pick("c", cand)
            # the first candidate at or after the previous pick's successor, in list order
            expected = next(backends[(pos + i) % n] for i in range(n) if backends[(pos + i) % n] in cand)
            assert got == expected
            pos = backends.index(expected) + 1

    prop()
