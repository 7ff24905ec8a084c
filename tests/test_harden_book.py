"""Issue 8, item 13 (a receive clock that jumps must not poison book samples or memory) and the
engine part of item 12 (a snapshot that leaves a one-sided book does not publish it as valid).

The rules under test are in the docstring of ``daedalus.etl.book``: a frame takes at most one
sample (the first grid time it passed), a short step back of the clock (measured from the last
grid time passed) pauses sampling, a longer one resumes after the frame and the last sample, one
of more than ``SAMPLE_CLOCK_RESTART`` intervals behind the last sample too restarts the grid, and
a book is valid only from a two-sided snapshot; a level2 frame lost by the parser is a gap."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daedalus.capture.records import control_line, frame_line
from daedalus.etl.book import CONNECT, FRAME, GAP, LOST, NO_PRICE, SAMPLE_CLOCK_RESTART, BookSet, Samples
from tests.etl_helpers import channel_table, recording_frames, run_etl, write_segments
from tests.test_etl_book import Event, Frame, make_batch, random_frames

ROOT = Path(__file__).resolve().parents[1]
SECOND = 10**9
DAY = 86_400 * SECOND
JUMPS = {"20min": 1_200 * SECOND, "7d": 7 * DAY, "30d": 30 * DAY, "10y": 3_652 * DAY}
T0 = 1_786_300_000 * SECOND  # 2026


class ReferenceBooks:
    """Dict books, validity and the sampling rules of ``daedalus.etl.book``, written plainly."""

    def __init__(self, interval: int, depth: int) -> None:
        self.interval, self.depth = interval, depth
        self.sides: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
        self.valid: dict[str, bool] = {}
        self.conn_of: dict[str, int] = {}
        self.last_seq: dict[int, int] = {}
        self.next: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.samples: list[tuple] = []  # (product, ts, valid, bids, asks)
        self.one_sided = 0

    def _grid_after(self, ts: int) -> int:
        return (ts // self.interval + 1) * self.interval

    def _invalidate(self, conn: int) -> None:
        for product, c in self.conn_of.items():
            if c == conn:
                self.valid[product] = False

    def top(self, product: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        bids, asks = self.sides[product]
        pad = [(0, 0)] * self.depth
        return ((sorted(bids.items(), reverse=True) + pad)[: self.depth], (sorted(asks.items()) + pad)[: self.depth])

    def _sample(self, product: str, ts: int) -> None:
        nxt = self.next[product]
        restart = SAMPLE_CLOCK_RESTART * self.interval
        if ts < nxt - self.interval - restart:  # the clock went back further than a short step
            last = self.last[product]
            self.next[product] = self._grid_after(ts if ts < last - restart else max(ts, last))
            return
        if ts < nxt:
            return
        bids, asks = self.top(product)
        crossed = bids[0][1] > 0 and asks[0][1] > 0 and bids[0][0] >= asks[0][0]
        self.samples.append((product, nxt, self.valid[product] and not crossed, bids, asks))
        self.last[product] = nxt
        self.next[product] = self._grid_after(ts)

    def frame(self, kind: int, conn: int, seq: int, aux: int, ts: int, events: list[Event]) -> None:
        if kind == CONNECT:
            self.last_seq.pop(conn, None)
            self._invalidate(conn)
            return
        if kind == LOST:
            self._invalidate(conn)
            self.last_seq[conn] = max(self.last_seq.get(conn, -1), seq)
            return
        if kind == GAP:
            self._invalidate(conn)
            self.last_seq[conn] = max(self.last_seq.get(conn, -1), aux - 1)
            return
        if seq >= 0:
            if conn in self.last_seq and seq != self.last_seq[conn] + 1:
                self._invalidate(conn)
            self.last_seq[conn] = seq
        for product, snap, rows in events:
            if product in self.sides:
                self._sample(product, ts)
            if snap:
                if product not in self.sides:
                    self.next[product] = self._grid_after(ts)
                    self.last[product] = self.next[product] - self.interval
                self.sides[product] = ({}, {})
            self.conn_of[product] = conn
            if product not in self.sides:
                continue
            for side, px, sz in rows:
                if sz:
                    self.sides[product][side][px] = sz
                else:
                    self.sides[product][side].pop(px, None)
            if snap:
                self.valid[product] = all(self.sides[product])
                self.one_sided += not self.valid[product]


def sample_tuples(books: BookSet, samples: Samples) -> list[tuple]:
    out = []
    for i in range(len(samples)):
        bids = list(zip(samples.bid_px[i].tolist(), samples.bid_sz[i].tolist(), strict=True))
        asks = list(zip(samples.ask_px[i].tolist(), samples.ask_sz[i].tolist(), strict=True))
        out.append((books.products[samples.product[i]], int(samples.ts[i]), bool(samples.valid[i]), bids, asks))
    return out


def steady_market(n: int, spacing: int, start: int = T0 + SECOND // 20) -> list[Frame]:
    """Product A: a snapshot, then one update frame every ``spacing`` ns moving the best bid."""
    frames: list[Frame] = [(FRAME, 1, 0, 0, start, [("A", True, [(0, 1_000, 5), (0, 990, 6), (1, 100_000, 7)])])]
    for i in range(1, n):
        frames.append((FRAME, 1, i, 0, start + i * spacing, [("A", False, [(0, 1_000 + i, i)])]))
    return frames


def restamp(frame: Frame, ts: int) -> Frame:
    kind, conn, seq, aux, _, events = frame
    return (kind, conn, seq, aux, ts, events)


def check_one_frame_ahead(jump: int) -> None:
    """Frames every 100 ms for 60 s, frame 300 stamped ``jump`` ahead: the samples are those of the
    clean stream (every grid second, the book after every earlier frame), except that the grid
    time the outlier passed shows the book before the outlier's changes, and nothing more."""
    clean = steady_market(600, SECOND // 10)
    jumped = [*clean[:300], restamp(clean[300], clean[300][4] + jump), *clean[301:]]
    books = BookSet(interval_ns=SECOND, depth=3)
    _, samples = books.apply(make_batch(books, jumped))
    got = sample_tuples(books, samples)

    truth = ReferenceBooks(SECOND, 3)  # independent of the clock rules: real times, no jump
    for frame in clean:
        truth.frame(*frame)
    assert [s[1] for s in got] == [s[1] for s in truth.samples]  # 59 grid seconds, none 20 min or 10 y ahead
    outlier_grid = (clean[299][4] // SECOND + 1) * SECOND
    for g, t in zip(got, truth.samples, strict=True):
        assert g[2] is True, "the book never lost validity"
        if g[1] != outlier_grid:
            assert g == t
    at_outlier = next(g for g in got if g[1] == outlier_grid)
    assert at_outlier[3][0] == (1_000 + 299, 299), "the outlier's grid time shows the book before the outlier"


def check_jump_that_stays(jump: int) -> None:
    """A jump forward that never comes back (a gap in the data, a clock step): one sample for the
    gap, then the grid goes on from the new time; memory and rows do not scale with the gap."""
    before = steady_market(50, SECOND // 10)
    after = [restamp(f, f[4] + jump) for f in steady_market(100, SECOND // 10)[50:]]
    books = BookSet(interval_ns=SECOND // 10, depth=3)
    _, samples = books.apply(make_batch(books, before + after))
    times = samples.ts.tolist()
    assert len(times) <= len(before) + len(after)
    assert times == sorted(set(times))
    gap_start = (before[-1][4] // (SECOND // 10) + 1) * (SECOND // 10)
    assert gap_start in times and times[times.index(gap_start) + 1] > after[0][4] - SECOND // 10
    assert books.s_ts.shape[0] <= 1024, "the sample buffer grew with the gap"


def test_one_frame_stamped_20_minutes_ahead_then_back() -> None:
    check_one_frame_ahead(JUMPS["20min"])
    check_jump_that_stays(JUMPS["20min"])


# In a child with its address space capped: the engine before the fix allocated a sample per
# interval across a jump (10 years: MemoryError, 30 days: GBs), which must not take this machine down.
CHILD = """
import json, resource, sys
from tests.test_harden_book import check_jump_that_stays, check_one_frame_ahead
check_one_frame_ahead(int(sys.argv[1]))
check_jump_that_stays(int(sys.argv[1]))
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))


@pytest.mark.parametrize("jump", [JUMPS["7d"], JUMPS["30d"], JUMPS["10y"]], ids=["7d", "30d", "10y"])
def test_a_jump_of_days_or_years_takes_bounded_samples_and_memory(jump: int) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(jump)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=_cap_address_space)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss_kb = json.loads(proc.stdout.strip().splitlines()[-1])["rss_kb"]
    assert rss_kb < 500 * 1024, f"peak RSS {rss_kb // 1024} MB"


def test_clock_step_back_pauses_a_short_while_or_restarts_the_grid() -> None:
    interval = SECOND // 10
    frames = steady_market(100, interval // 2)  # 2 frames per interval, to t0 + 5 s
    last = frames[-1][4]
    short = [restamp(f, last - 5 * interval + i * interval // 2) for i, f in enumerate(steady_market(40, 1)[1:])]
    books = BookSet(interval_ns=interval, depth=3)
    _, samples = books.apply(make_batch(books, frames + [(k, c, s + 99, a, t, e) for k, c, s, a, t, e in short]))
    times = samples.ts.tolist()
    assert times == sorted(set(times)), "a short step back sampled a time twice"
    assert times[-1] > last, "sampling did not resume once the data passed the last sample"
    assert samples.valid.all()

    far = [restamp(f, last - 3_600 * SECOND + i * interval // 2) for i, f in enumerate(steady_market(40, 1)[1:])]
    books = BookSet(interval_ns=interval, depth=3)
    _, samples = books.apply(make_batch(books, frames + [(k, c, s + 99, a, t, e) for k, c, s, a, t, e in far]))
    times = samples.ts.tolist()
    restarted = [t for t in times if t < frames[0][4]]
    assert len(restarted) >= 15, "sampling did not restart after the clock was stepped back an hour"
    assert restarted == sorted(set(restarted)) and restarted[0] == (far[0][4] // interval + 1) * interval


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_engine_samples_match_the_reference_through_jumps_steps_and_a_checkpoint(seed: int) -> None:
    """Random books (gaps, reconnects, crossings) on a clock with outliers ahead, short and long
    steps back; the engine's samples equal the plain reference, also across a checkpoint."""
    rng = random.Random(seed)
    interval = 10_000_000
    frames = random_frames(rng, 6000, ["A", "B", "C"], levels=40)
    offset = 0
    stamped = []
    for frame in frames:
        r = rng.random()
        if r < 0.002:
            offset -= rng.choice((3 * interval, 2 * SECOND, 2 * DAY))  # a step back, short or long
        ts = frame[4] + T0 + offset
        if r > 0.995:
            ts += rng.choice((JUMPS["20min"], 3_600 * SECOND))  # one frame ahead (the capped child has days)
        stamped.append(restamp(frame, ts))
    reference = ReferenceBooks(interval, 4)
    for frame in stamped:
        reference.frame(*frame)
    books = BookSet(interval_ns=interval, depth=4, chunks=16, chunk_size=8)
    _, first = books.apply(make_batch(books, stamped[:3000]))
    restored = BookSet.from_arrays(list(books.products), books.to_arrays(), interval, 4, 8)
    _, second = restored.apply(make_batch(restored, stamped[3000:]))
    got = sample_tuples(books, first) + sample_tuples(restored, second)
    assert len(got) == len(reference.samples) and len(got) < len(stamped)
    for i, (g, e) in enumerate(zip(got, reference.samples, strict=True)):
        assert g == e, f"sample {i}: engine {g} != reference {e}"
    assert any(not s[2] for s in got) and any(s[2] for s in got)


def test_jitter_after_a_quiet_period_does_not_sample_a_later_book() -> None:
    """The review's case: after an hour without frames the last sample lies far back; 100 ns of
    jitter must pause sampling, not restart the grid after that old sample with today's book."""
    frames: list[Frame] = [
        (FRAME, 1, -1, 0, 1_500, [("A", True, [(0, 100, 1), (1, 200, 1)])]),
        (FRAME, 1, -1, 0, 2_100, [("A", False, [(0, 100, 2)])]),
        (FRAME, 1, -1, 0, 3_603_000, [("A", False, [(0, 100, 9)])]),
        (FRAME, 1, -1, 0, 3_602_900, [("A", False, [(0, 100, 7)])]),  # 100 ns of jitter back
        (FRAME, 1, -1, 0, 3_604_100, [("A", False, [(0, 100, 8)])]),
    ]
    books = BookSet(interval_ns=1_000, depth=1)
    _, samples = books.apply(make_batch(books, frames))
    assert list(zip(samples.ts.tolist(), samples.bid_sz[:, 0].tolist(), strict=True)) == [
        (2_000, 1), (3_000, 2), (3_604_000, 7)]  # fmt: skip


def jittery_market(rng: random.Random, n: int, interval: int) -> list[Frame]:
    """Two products on one connection, quiet periods of up to an hour, and receive times that
    step back by up to ``SAMPLE_CLOCK_RESTART`` intervals behind the latest one (jitter)."""
    frames: list[Frame] = [(FRAME, 1, -1, 0, T0 + i, [(p, True, [(0, 100, 5), (1, 200, 5)])])
                           for i, p in enumerate("AB")]  # fmt: skip
    clock = T0 + 2
    for _ in range(n):
        r = rng.random()
        clock += rng.choice((3_600 * SECOND, rng.randint(1, 100) * interval)) if r < 0.05 else rng.randint(0, interval)
        ts = clock - rng.randint(0, SAMPLE_CLOCK_RESTART * interval) if rng.random() < 0.3 else clock
        rows = [(side, rng.randint(90, 100) if side == 0 else rng.randint(101, 110), rng.randint(0, 9))
                for side in (rng.randint(0, 1) for _ in range(rng.randint(1, 3)))]  # fmt: skip
        frames.append((FRAME, 1, -1, 0, ts, [(rng.choice("AB"), False, rows)]))
    return frames


def truth_samples(frames: list[Frame], interval: int, depth: int) -> list[tuple]:
    """The invariant, not the engine's rule: in data order, a product's frame stamped past every
    earlier one of its frames takes the first grid time after them, if it reached it, showing the
    book before that frame; plain dict books."""
    sides: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
    latest: dict[str, int] = {}
    out = []
    for _, _, _, _, ts, events in frames:
        for product, snap, rows in events:
            if product in sides:
                grid = (latest[product] // interval + 1) * interval
                if ts >= grid:
                    bids, asks = sides[product]
                    pad = [(0, 0)] * depth
                    out.append((product, grid, True, (sorted(bids.items(), reverse=True) + pad)[:depth],
                                (sorted(asks.items()) + pad)[:depth]))  # fmt: skip
                latest[product] = max(latest[product], ts)
            elif snap:
                latest[product] = ts
            if snap:
                sides[product] = ({}, {})
            for side, px, sz in rows:
                if sz:
                    sides[product][side][px] = sz
                else:
                    sides[product][side].pop(px, None)
    return sorted(out, key=lambda s: (s[1], s[0]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_samples_under_jitter_and_quiet_periods_never_show_a_later_book(seed: int) -> None:
    interval, depth = 1_000_000, 3
    frames = jittery_market(random.Random(seed), 5_000, interval)
    books = BookSet(interval_ns=interval, depth=depth)
    _, samples = books.apply(make_batch(books, frames))
    got = sorted(sample_tuples(books, samples), key=lambda s: (s[1], s[0]))
    want = truth_samples(frames, interval, depth)
    assert len(want) > 1_000
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"sample {i}: engine {g} != truth {w}"


def test_a_lost_level2_frame_is_always_a_gap() -> None:
    """The parser sends a rejected level2 frame as LOST, with its sequence number or -1: either
    way the connection's books are invalid until a snapshot, and the sequence moves on past it."""
    snap = [("A", True, [(0, 100, 1), (1, 101, 1)])]
    update = [("A", False, [(0, 99, 1)])]
    frames: list[Frame] = [
        (FRAME, 1, 0, 0, 1_000, snap),
        (LOST, 1, -1, 0, 1_100, []),  # no sequence_num: a gap all the same
        (FRAME, 1, 1, 0, 1_200, update),
        (FRAME, 1, 2, 0, 1_300, snap),
        (LOST, 1, 3, 0, 1_400, []),  # in sequence, yet its updates are missing
        (FRAME, 1, 4, 0, 1_500, update),  # follows the lost one: no second gap
        (FRAME, 1, 5, 0, 1_600, snap),
    ]
    books = BookSet()
    result, _ = books.apply(make_batch(books, frames))
    assert result.valid.tolist() == [True, True, False, True, True, False, True, True]
    assert books.counters("A")["gaps"] == 2


# ---- one-sided snapshots (item 12, the engine part) ----------------------------------------
def test_a_one_sided_snapshot_is_not_valid_until_a_two_sided_snapshot() -> None:
    books = BookSet(interval_ns=1_000, depth=2)
    frames: list[Frame] = [
        (FRAME, 1, 0, 0, 1_500, [("A", True, [(0, 100, 1), (0, 99, 2)])]),  # bids only
        (FRAME, 1, 1, 0, 1_600, [("A", False, [(1, 105, 3)])]),  # an update adds an ask: still invalid
        (FRAME, 1, 2, 0, 2_100, [("A", True, [(0, 100, 1), (1, 101, 0)])]),  # the ask has size 0: one-sided
        (FRAME, 1, 3, 0, 3_100, [("A", True, [(0, 100, 1), (1, 101, 4)])]),  # two sides: valid
        (FRAME, 1, 4, 0, 4_100, [("A", False, [(1, 101, 0)])]),  # an update empties a side: still valid
    ]
    result, samples = books.apply(make_batch(books, frames))
    assert result.valid.tolist() == [False, False, False, False, False, True, True, True]
    assert result.best_ask.tolist() == [NO_PRICE, NO_PRICE, 105, NO_PRICE, NO_PRICE, 101, 101, NO_PRICE]
    assert books.counters("A")["one_sided"] == 2 and books.counters("A")["snapshots"] == 3
    assert samples.ts.tolist() == [2_000, 3_000, 4_000]
    assert samples.valid.tolist() == [False, False, True]

    restored = BookSet.from_arrays(list(books.products), books.to_arrays(), 1_000, 2)
    assert restored.counters("A") == books.counters("A")
    assert restored.next_sample[0] == books.next_sample[0] and restored.last_sample[0] == books.last_sample[0]


def test_a_checkpoint_from_before_last_sample_and_one_sided_still_loads() -> None:
    books = BookSet(interval_ns=1_000, depth=2)
    books.apply(make_batch(books, steady_market(10, 300, start=1_500)))
    arrays = books.to_arrays()
    del arrays["last_sample"]
    arrays["pcount"] = arrays["pcount"][:, :4]
    restored = BookSet.from_arrays(list(books.products), arrays, 1_000, 2)
    assert restored.last_sample[0] == restored.next_sample[0] - 1_000
    assert restored.counters("A")["one_sided"] == 0
    assert restored.counters("A")["snapshots"] == 1


# ---- end to end ---------------------------------------------------------------------------
def recording_with_jump(jump: int) -> tuple[list[bytes], int]:
    """The recording as raw lines, one level2 update frame in the middle stamped ``jump`` ahead."""
    frames = recording_frames()
    updates = [i for i, (_, f, _) in enumerate(frames) if f.get("channel") == "l2_data" and
               f["events"][0]["type"] == "update"]  # fmt: skip
    outlier = updates[len(updates) // 2]
    lines = [control_line(frames[0][0] - 1, 1, "connect", {"url": "wss://advanced-trade-ws.coinbase.com"})]
    lines += [frame_line(recv + (jump if i == outlier else 0), 1, text) for i, (recv, _, text) in enumerate(frames)]
    return lines, frames[-1][0]


def sample_rows(data_dir: Path) -> list[tuple]:
    table = channel_table(data_dir, "book_snapshot_10")
    rows = table.drop_columns([c for c in table.column_names if c in ("date", "ts_event")]).to_pylist()
    return [tuple(sorted(r.items())) for r in sorted(rows, key=lambda r: (r["product_id"], r["ts_recv"]))]


# The recording is from 2026-08: 7 days ahead is still in the past, so the parser keeps the line
# (it quarantines receive times more than a day past the wall clock; the capped child covers 10 y).
@pytest.mark.parametrize(("jump", "interval_ms"), [(JUMPS["20min"], 100), (JUMPS["7d"], 1_000)], ids=["20min", "7d"])
def test_etl_with_a_frame_stamped_ahead_keeps_the_segment_and_the_samples_of_the_clean_run(
    tmp_path: Path, jump: int, interval_ms: int
) -> None:
    sampling = {"book_snapshot": {"snapshot_interval_ms": interval_ms}}
    clean_lines, end = recording_with_jump(0)
    write_segments(tmp_path / "clean", [clean_lines[:500], clean_lines[500:]])
    run_etl(tmp_path / "clean", channels=sampling)
    lines, _ = recording_with_jump(jump)
    write_segments(tmp_path / "jumped", [lines[:500], lines[500:]])
    summary = run_etl(tmp_path / "jumped", channels=sampling)
    assert summary.quarantined_lines == 0 and summary.quarantined_segments == 0
    clean, jumped = sample_rows(tmp_path / "clean"), sample_rows(tmp_path / "jumped")
    assert max(dict(r)["ts_recv"] for r in jumped) <= end, "a sample was taken at the outlier's time"
    assert len(jumped) <= len(clean)
    assert len(set(clean) - set(jumped)) <= 1  # only the grid time the outlier passed differs
    assert np.all([dict(r)["book_valid"] for r in jumped])
