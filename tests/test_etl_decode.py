"""The compiled string parsers agree with Arrow's exact casts; numbers they cannot read
exactly are refused, times in other formats go to the slow path, nothing is guessed."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.etl.coinbase import times_ns
from daedalus.etl.decode import parse_units


def arrow_units(values: list[str]) -> np.ndarray:
    decimals = pc.cast(pa.array(values), pa.decimal128(38, 8))
    return np.frombuffer(decimals.buffers()[1], np.int64)[::2]


def test_units_equal_arrow_decimal_casts_on_random_feed_numbers() -> None:
    rng = random.Random(3)
    values = [f"{rng.uniform(0, 1e6):.{rng.randint(0, 8)}f}" for _ in range(50_000)]
    values += ["0", "0.100000000", "92233720368.54775807", "007.50"]
    units, ok, valid = parse_units(pa.array(values), plain=True)
    assert ok.all() and valid.all()
    assert (units == arrow_units(values)).all()


def test_units_refuse_what_is_not_an_exact_number_of_units() -> None:
    """Not the feed's shape (signs, exponents, a bare point), not exact in 1e-8 units or beyond
    int64: refused, never rounded or wrapped; a null is refused and reported as not valid."""
    values = ["1e-5", "0.000000001", "92233720368.54775808", "abc", "", "-", "1.2.3", None, "NaN", "Infinity",
              "-1.5", "+2", "12.", ".5"]  # fmt: skip
    _, ok, valid = parse_units(pa.array(values, pa.string()), plain=True)
    assert not ok.any()
    assert valid.tolist() == [v is not None for v in values]


def test_times_equal_arrow_casts_and_other_offsets_use_the_slow_path() -> None:
    rng = random.Random(4)
    values = [
        f"{rng.randint(1970, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
        f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 10**9 - 1):0{rng.randint(1, 9)}d}Z"
        for _ in range(20_000)
    ]
    values += ["2024-02-29T23:59:59Z", "1970-01-01T00:00:00Z", "2026-08-09T21:05:42+01:00"]
    ns, ok = times_ns(pa.array(values))
    assert ok.all()
    assert ns.tolist() == pc.cast(pa.array(values), pa.timestamp("ns", "UTC")).cast(pa.int64()).to_pylist()
    _, bad = times_ns(pa.array(["garbage", "2026-13-01T00:00:00Z", None], pa.string()))
    assert not bad.any()
