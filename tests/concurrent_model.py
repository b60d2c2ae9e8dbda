"""A per-sector register model of one volume under concurrent clients, and its checker (for
tests/test_concurrent_clients.py).

Clients of one volume (gRPC and NBD, several at once, and one that resizes it) record every
operation in a :class:`History`: what it asked, when it was invoked and when its reply came
(``time.monotonic``), and how it ended. Every write stamps each unit (a sector, or 512
bytes when NBD writes inside sectors) with 16-byte records naming the write and the unit
(:func:`stamps`), so a read says, unit by unit, which write it shows (:func:`decode`). A
lower layer may be pre-filled with write id :data:`BASE`. :func:`check` then looks, unit by
unit, for what no order of the operations consistent with real time could give:

* TORN / MISPLACED: a unit that is neither zeros nor one whole stamp of its own number;
* FUTURE: a value of a write invoked after the read had completed;
* NOWHERE: a value (zeros included) that no write, zeroing or the initial content gave;
* STALE: a value superseded by an operation (a write, an unmap or zeroing, a shrink below
  the unit) invoked after that value's write completed and completed before the read began;
* READ-READ ORDER: a read that began after another one completed shows an older value
  (one whose write completed before the other read's write began);
* FAILED WRITE VISIBLE: a refused write's data is seen (refused zeroing gives no zeros);
* NO_OVERWRITE LANDED: a ``no_overwrite`` write shows where a plain write certainly came
  first (no zeroing could lie between), or where the pre-filled lower layer holds the unit;
* SUCCEEDED PAST END / REFUSED INSIDE: an operation's outcome disagrees with every size the
  volume could have had while it ran (the resizes, by one client, give those sizes);
* WRONG REFUSAL / UNEXPECTED ERROR: a refusal not of the documented kind for the front end
  and command (gRPC ``OUT_OF_RANGE``; NBD ``EINVAL`` for READ, TRIM and CACHE, ``ENOSPC``
  for WRITE and WRITE_ZEROES), or any other failure (flushes and resizes included): no
  operation of these clients has a reason to fail but a range past the end;
* FINAL: the final whole-volume reads (gRPC and NBD, after every client finished) failed
  or differ (each is also checked as a read above, so it holds the latest values).

Every outcome is taken as definite: a refused operation changed nothing; the clients send
no deadline short enough to expire and do not retry.

These are necessary conditions of per-unit linearizability, not a full search: zeros are
not unique, so a zero read is judged by the zeroing that completed last among those that
could have given it; a no_overwrite write is never taken to supersede anything (it may
not have landed).
"""

from __future__ import annotations

import bisect
import struct
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = [
    "BASE",
    "INF",
    "REFUSALS",
    "TORN",
    "ZERO",
    "Front",
    "History",
    "Kind",
    "Op",
    "check",
    "decode",
    "stamps",
    "summary",
]

MAGIC = b"TDCK"
RECORD = struct.Struct("<4sIQ")  # magic, write id, unit number: 16 bytes
BASE = 0
"""Write id of the pre-filled content of a lower layer (or an origin)."""
ZERO = -1
"""Value of an all-zero unit."""
TORN = -2
"""Value of a unit that is neither zeros nor one whole stamp."""
INF = float("inf")

Kind = Literal["read", "write", "nowrite", "unmap", "zero", "flush", "cache", "resize"]
Front = Literal["grpc", "nbd"]

REFUSALS: dict[tuple[Front, Kind], str] = {
    ("grpc", "read"): "OutOfRange",
    ("grpc", "write"): "OutOfRange",
    ("grpc", "nowrite"): "OutOfRange",
    ("grpc", "unmap"): "OutOfRange",
    ("nbd", "read"): "nbd:22",  # EINVAL
    ("nbd", "unmap"): "nbd:22",  # TRIM
    ("nbd", "cache"): "nbd:22",
    ("nbd", "write"): "nbd:28",  # ENOSPC
    ("nbd", "zero"): "nbd:28",  # WRITE_ZEROES
}
"""The error each (front end, operation) gets for a range past the volume's end: the only
failure the checked clients may see."""


def stamps(wid: int, unit: int, count: int, unit_size: int) -> bytes:
    """The data write ``wid`` writes to ``count`` units from ``unit``: each unit the record
    ``(MAGIC, wid, its number)`` repeated."""
    return b"".join(
        RECORD.pack(MAGIC, wid, u) * (unit_size // RECORD.size) for u in range(unit, unit + count)
    )


def decode(data: bytes, unit: int, unit_size: int) -> tuple[list[int], list[str]]:
    """The value of each unit of ``data`` read from ``unit`` (a write id, :data:`ZERO` or
    :data:`TORN`) and a description of each torn or misplaced one."""
    values: list[int] = []
    problems: list[str] = []
    zero = bytes(unit_size)
    for i in range(len(data) // unit_size):
        chunk = data[i * unit_size : (i + 1) * unit_size]
        u = unit + i
        if chunk == zero:
            values.append(ZERO)
            continue
        record = chunk[: RECORD.size]
        if record[:4] == MAGIC and record * (unit_size // RECORD.size) == chunk:
            _, wid, of = RECORD.unpack(record)
            if of != u:
                problems.append(f"unit {u} holds write {wid}'s data for unit {of} (misplaced)")
                values.append(TORN)
            else:
                values.append(wid)
            continue
        parts = []  # what each 512 bytes holds
        for j in range(0, unit_size, 512):
            sub = chunk[j : j + 512]
            if sub == bytes(512):
                parts.append("0")
            elif sub[:4] == MAGIC and sub[:16] * 32 == sub:
                parts.append(str(RECORD.unpack(sub[:16])[1]))
            else:
                parts.append("?")
        problems.append(f"unit {u} is torn or garbage, per 512 bytes: {','.join(parts)}")
        values.append(TORN)
    return values, problems


@dataclass
class Op:
    """One operation of a history. Ranges are in model units: ``[unit, unit + count)`` is
    what it may change or read; ``req_end`` the end of the range the volume's size is
    checked against (the same, unless set; 0 for a request that is a no-op and must
    succeed whatever the size, e.g. an NBD TRIM with no whole sector inside its range)."""

    index: int
    kind: Kind
    client: str
    front: Front
    unit: int = 0
    count: int = 0
    req_end: int = 0
    wid: int = 0
    inv: float = 0.0
    resp: float = INF
    ok: bool = False
    err: str = ""
    values: list[int] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    new_units: int = 0
    old_units: int = 0

    def succeed(self, data: bytes | None = None, unit_size: int = 0) -> None:
        """It completed now (a read: with ``data``, decoded)."""
        self.resp = time.monotonic()
        self.ok = True
        if data is not None:
            self.values, self.torn = decode(data, self.unit, unit_size)

    def fail(self, err: str) -> None:
        """It failed now, with the error code ``err`` (see :data:`REFUSALS`)."""
        self.resp = time.monotonic()
        self.err = err

    def __str__(self) -> str:
        if self.kind == "resize":
            what = f"resize {self.old_units}->{self.new_units}"
        else:
            what = f"{self.kind} [{self.unit},+{self.count})" + (
                f" wid={self.wid}" if self.wid else ""
            )
        end = "ok" if self.ok else f"err={self.err}"
        return f"op#{self.index} {self.client} {what} [{self.inv:.4f},{self.resp:.4f}] {end}"


@dataclass
class History:
    """The operations on one volume of ``units`` units of ``unit_size`` bytes, whose lower
    layer holds :data:`BASE` everywhere at the start when ``base``."""

    units: int
    unit_size: int
    base: bool
    ops: list[Op] = field(default_factory=list)
    next_wid: int = BASE + 1

    def begin(
        self,
        kind: Kind,
        client: str,
        front: Front,
        unit: int = 0,
        count: int = 0,
        *,
        req_end: int | None = None,
        inv: float | None = None,
    ) -> Op:
        """Record an operation invoked now (or at ``inv``); writes get a fresh write id."""
        wid = 0
        if kind in ("write", "nowrite"):
            wid, self.next_wid = self.next_wid, self.next_wid + 1
        op = Op(
            index=len(self.ops),
            kind=kind,
            client=client,
            front=front,
            unit=unit,
            count=count,
            req_end=unit + count if req_end is None else req_end,
            wid=wid,
        )
        self.ops.append(op)
        op.inv = time.monotonic() if inv is None else inv
        return op


class Effect(NamedTuple):
    """What an operation may have left in one unit: ``value`` from ``inv`` on; certainly
    there by ``until`` (its completion; INF when it may not have taken effect); ``allowed``
    to show at all (it succeeded, or it is the initial content)."""

    inv: float
    until: float
    value: int
    op: Op | None  # None: the initial content
    allowed: bool


def _effects(history: History) -> list[list[Effect]]:
    """Per unit, every effect on it, sorted by invocation."""
    n = history.units
    per = [[Effect(-INF, -INF, BASE if history.base else ZERO, None, True)] for _ in range(n)]
    for o in history.ops:
        if o.kind in ("write", "nowrite", "unmap", "zero"):
            certain = o.ok and o.kind != "nowrite"  # a no_overwrite write may not land
            value = o.wid if o.kind in ("write", "nowrite") else ZERO
            until = o.resp if certain else INF
            for u in range(o.unit, min(n, o.unit + o.count)):
                per[u].append(Effect(o.inv, until, value, o, o.ok))
        elif o.kind == "resize" and o.new_units < o.old_units:
            for u in range(o.new_units, n):  # a shrink: grown back, it reads zeros
                per[u].append(Effect(o.inv, o.resp if o.ok else INF, ZERO, o, o.ok))
    for effects in per:
        effects.sort(key=lambda e: e.inv)
    return per


class _Unit:
    """The effects on one unit, indexed for the checks."""

    def __init__(self, effects: list[Effect]) -> None:
        self.effects = effects
        self.invs = [e.inv for e in effects]
        self.min_until = [INF] * (len(effects) + 1)  # suffix minimum of `until`
        for k in range(len(effects) - 1, -1, -1):
            self.min_until[k] = min(self.min_until[k + 1], effects[k].until)
        # a refused unmap or zeroing, or a failed shrink, gives no zeros
        self.zeroings = [e for e in effects if e.value == ZERO and e.allowed]
        self.zero_invs = [z.inv for z in self.zeroings]
        self.latest: list[Effect] = []  # of zeroings[:k + 1], the one certain last
        for z in self.zeroings:
            self.latest.append(
                z if not self.latest or z.until > self.latest[-1].until else self.latest[-1]
            )
        self.by_value = {e.value: e for e in effects if e.value != ZERO}

    def latest_zeroing(self, before: float) -> Effect | None:
        """Of the zeroings invoked before ``before``, the one certain last (None: none)."""
        k = bisect.bisect_left(self.zero_invs, before)
        return self.latest[k - 1] if k else None

    def superseder(self, after: float, before: float) -> Effect | None:
        """An effect invoked after ``after`` and certain before ``before``, if any."""
        k = bisect.bisect_right(self.invs, after)
        if self.min_until[k] < before:
            return next(e for e in self.effects[k:] if e.until < before)
        return None


def _desc(op: Op | None) -> str:
    return "the initial content" if op is None else str(op)


def check(history: History) -> list[str]:
    """Every violation of the model in ``history`` (see the module's docstring); empty when
    none is found."""
    n = history.units
    ops = history.ops
    problems: list[str] = []
    units = [_Unit(effects) for effects in _effects(history)]
    resizes = sorted((o for o in ops if o.kind == "resize"), key=lambda o: o.inv)
    # (read inv, read resp, its value's write inv, when that value was certainly there)
    seen: list[list[tuple[float, float, float, float, Op]]] = [[] for _ in range(n)]
    for r in ops:
        if r.kind != "read" or not r.ok:
            continue
        for torn in r.torn:
            problems.append(f"TORN/MISPLACED: {r}: {torn}")
        for i, v in enumerate(r.values):
            u = r.unit + i
            if v == TORN or u >= n:
                continue
            unit = units[u]
            if v == ZERO:
                latest = unit.latest_zeroing(r.resp)
                if latest is None:
                    problems.append(f"NOWHERE: {r} unit {u} reads zeros; nothing could zero it")
                    continue
                sup = unit.superseder(latest.until, r.inv)
                if sup is not None:
                    problems.append(
                        f"STALE: {r} unit {u} reads zeros (at the latest from "
                        f"{_desc(latest.op)}); superseded by {_desc(sup.op)}"
                    )
                seen[u].append((r.inv, r.resp, -INF, latest.until, r))
                continue
            e = unit.by_value.get(v)
            if e is None:
                problems.append(f"NOWHERE: {r} unit {u} shows write {v}, which never wrote it")
                continue
            w = e.op
            if w is not None:
                if w.inv >= r.resp:
                    problems.append(f"FUTURE: {r} unit {u} shows {w}, invoked after it")
                if not e.allowed:
                    problems.append(f"FAILED WRITE VISIBLE: {r} unit {u} shows {w}")
                if w.kind == "nowrite":
                    problems += _nowrite_landed(history, units[u], resizes, r, u, w)
            w_inv = -INF if w is None else w.inv
            w_done = -INF if w is None else w.resp
            sup = unit.superseder(w_done, r.inv)
            if sup is not None:
                problems.append(f"STALE: {r} unit {u} shows {_desc(w)}; superseded by {sup.op}")
            seen[u].append((r.inv, r.resp, w_inv, w_done, r))
    problems += _read_read_order(seen)
    problems += _outcomes(history, resizes)
    problems += _finals(history)
    return problems


def _nowrite_landed(
    history: History, unit: _Unit, resizes: list[Op], r: Op, u: int, nw: Op
) -> list[str]:
    """A ``no_overwrite`` write ``nw`` that read ``r`` shows in unit ``u`` may land only
    where no layer held the unit when it took effect: not after a plain write that
    completed before ``r`` began and could have come before ``nw`` (unless a zeroing could
    lie between them), nor (pre-filled lower layer) where no shrink below the unit came
    before ``nw`` ended."""
    out: list[str] = []
    # a zeroing may lie between a plain write w and nw if it may end after w begins
    zeroing = unit.latest_zeroing(nw.resp)
    zeroed = -INF if zeroing is None else zeroing.until
    for e in unit.effects:
        w = e.op
        if w is None or w.kind != "write" or not w.ok or w.resp >= r.inv or w.inv >= nw.resp:
            continue
        if zeroed <= w.inv:
            out.append(
                f"NO_OVERWRITE LANDED: {r} unit {u} shows {nw}, though {w} completed before "
                "the read and could not come after it"
            )
            break
    if history.base and not any(o.new_units <= u and o.inv < nw.resp for o in resizes):
        out.append(f"NO_OVERWRITE LANDED: {r} unit {u} shows {nw} over the lower layer's data")
    return out


def _read_read_order(seen: list[list[tuple[float, float, float, float, Op]]]) -> list[str]:
    """Reads of a unit that began after another read completed show no older value."""
    out: list[str] = []
    for u, lst in enumerate(seen):
        if len(lst) < 2:
            continue
        by_resp = sorted(lst, key=lambda x: x[1])
        resps = [x[1] for x in by_resp]
        newest: list[tuple[float, int]] = []  # prefix maximum of the value's write inv
        best = (-INF, -1)
        for k, x in enumerate(by_resp):
            if x[2] > best[0]:
                best = (x[2], k)
            newest.append(best)
        for x in lst:
            k = bisect.bisect_left(resps, x[0]) - 1  # the reads completed before x began
            if k < 0:
                continue
            w_inv, idx = newest[k]
            if x[3] < w_inv:
                out.append(
                    f"READ-READ ORDER: unit {u}: {x[4]} shows a value certain by {x[3]:.4f}, "
                    f"older than the one earlier {by_resp[idx][4]} showed (its write began "
                    f"{w_inv:.4f})"
                )
    return out


def _outcomes(history: History, resizes: list[Op]) -> list[str]:
    """Failures only of the documented refusal kind, and only when a size the volume could
    have had refuses the range; successes only when one takes it."""
    out: list[str] = []
    for o in history.ops:
        if o.ok or o.client.startswith("final"):
            continue
        expected = REFUSALS.get((o.front, o.kind))
        if expected is None:
            out.append(f"UNEXPECTED ERROR: {o}")
        elif o.err != expected:
            refusal = o.err.startswith("nbd:") or o.err == "OutOfRange"
            what = "WRONG REFUSAL" if refusal else "UNEXPECTED ERROR"
            out.append(f"{what}: {o}; a refusal would be {expected}")
    if any(not o.ok for o in resizes):
        return out  # sizes unknown (a failed resize is reported above)
    epochs: list[tuple[int, float, float]] = []  # (size, possible from, possible until)
    size, since = history.units, -INF
    for o in resizes:
        epochs.append((size, since, o.resp))
        size, since = o.new_units, o.inv
    epochs.append((size, since, INF))
    for o in history.ops:
        if o.kind not in ("read", "write", "nowrite", "unmap", "zero", "cache"):
            continue
        if o.client.startswith("final"):
            continue
        possible = [s for s, a, b in epochs if a < o.resp and b > o.inv]
        if o.ok and o.req_end > max(possible):
            out.append(f"SUCCEEDED PAST END: {o} (to {o.req_end}); sizes possible {possible}")
        if not o.ok and o.req_end <= min(possible):
            out.append(f"REFUSED INSIDE: {o} (to {o.req_end}); sizes possible {possible}")
    return out


def _finals(history: History) -> list[str]:
    """The final reads of both front ends (if the history has them) succeeded and agree."""
    finals = [o for o in history.ops if o.client.startswith("final")]
    out = [f"FINAL READ FAILED: {o}" for o in finals if not o.ok]
    ok = [o for o in finals if o.ok]
    for o in ok[1:]:
        common = min(len(o.values), len(ok[0].values))
        diff = [u for u in range(common) if o.values[u] != ok[0].values[u]]
        if diff:
            out.append(f"FINAL MISMATCH: {o} and {ok[0]} differ at {len(diff)} units: {diff[:8]}")
    return out


def summary(history: History) -> dict[str, int]:
    """What a history exercised: operations by kind and outcome (``read`` ok, ``read!``
    failed), resizes that shrank (``shrink``) and grew (``regrow``), reads by one front end
    that showed a write made through the other (``cross``), and units read showing the
    pre-filled lower layer's data (``base seen``)."""
    counts: dict[str, int] = {}

    def add(key: str, by: int = 1) -> None:
        counts[key] = counts.get(key, 0) + by

    front_of = {o.wid: o.front for o in history.ops if o.wid}
    for o in history.ops:
        add(o.kind + ("" if o.ok else "!"))
        if o.kind == "resize" and o.ok:
            add("shrink" if o.new_units < o.old_units else "regrow")
        if o.kind == "read" and o.ok:
            add("cross", sum(1 for v in o.values if v in front_of and front_of[v] != o.front))
            add("base seen", sum(1 for v in o.values if v == BASE))
    return counts
