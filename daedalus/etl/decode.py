"""Compiled parsers for the two string formats the feed is made of, straight from Arrow's
string buffers: decimal numbers -> int64 units of 1e-8, RFC 3339 times -> ns since epoch.

Why not Arrow's casts: they are exact but cost ~50 ns a value and there are two or three
per level2 update; these loops cost a few ns. Anything they do not recognise is reported
per value: a number that is not exact in int64 units of 1e-8 (exponents, more than 8
decimals) is refused; a time in another format goes to the caller's slow, general parser,
so results never depend on which path ran.

``plain=True`` is the feed's own number shape and nothing else, and what the ETL uses: ASCII
digits, optionally a point followed by digits (``123``, ``0.00000001``); no sign, no
exponent, no spaces (without it a leading ``-``/``+`` is read too). Times
are read only for years the fast path can hold in int64 ns without wrapping (1900..2199);
others go to the caller's slow path, which refuses what int64 ns cannot represent.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numba import njit

_MAX_TENTH = (2**63 - 1) // 10  # acc * 10 + d fits int64 iff acc < this, or == this and d <= 7


def _buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, bytes, valid) of a string array, without copying the bytes."""
    if strings.type != pa.string():
        strings = strings.cast(pa.string())
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int32)[strings.offset : strings.offset + n + 1]
    data = strings.buffers()[2]
    chars = np.frombuffer(data if data is not None else b"", np.uint8)  # read-only either way: one signature
    valid = strings.is_valid().to_numpy(zero_copy_only=False)
    return offsets, chars, valid


def parse_units(strings: pa.Array, plain: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decimal strings -> (units of 1e-8, parsed, valid). ``parsed`` is False for nulls and
    for values this fast path does not handle (with ``plain``: for anything but the feed's
    unsigned ``digits[.digits]``)."""
    offsets, chars, valid = _buffers(strings)
    units = np.zeros(len(strings), np.int64)
    parsed = np.zeros(len(strings), np.bool_)
    _units(offsets, chars, valid, units, parsed, plain)
    return units, parsed, valid


def parse_times(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RFC 3339 UTC strings (``2026-08-09T21:05:48.210883Z``) -> (ns, parsed, valid)."""
    offsets, chars, valid = _buffers(strings)
    out = np.zeros(len(strings), np.int64)
    parsed = np.zeros(len(strings), np.bool_)
    _times(offsets, chars, valid, out, parsed)
    return out, parsed, valid


@njit(cache=True)
def _units(offsets, chars, valid, out, parsed, plain):
    for i in range(out.shape[0]):
        if not valid[i]:
            continue
        value, ok = units_at(chars, offsets[i], offsets[i + 1], plain)
        if ok:
            out[i] = value
            parsed[i] = True


@njit(cache=True, _nrt=False)  # no allocation: no reference counting (see daedalus.etl.l2scan)
def units_at(chars, a, b, plain):
    """``chars[a:b]`` as int64 units of 1e-8: (value, ok). Shared by the column parser above
    and the level2 scanner (:mod:`daedalus.etl.l2scan`), so both accept exactly the same text."""
    if a == b:
        return 0, False
    if plain and (chars[a] == 46 or chars[b - 1] == 46):  # ".5", "12.": not the feed's shape
        return 0, False
    neg = False
    if not plain and (chars[a] == 45 or chars[a] == 43):  # - +
        neg = chars[a] == 45
        a += 1
    acc = 0
    frac = -1  # digits after the point, -1 before it
    digits = 0
    for j in range(a, b):
        c = chars[j]
        if c == 46 and frac < 0:  # .
            frac = 0
            continue
        d = c - 48
        if d < 0 or d > 9:
            return 0, False
        if frac >= 8:
            if d != 0:  # finer than 1e-8: not exact here
                return 0, False
            continue
        if acc >= _MAX_TENTH and (acc > _MAX_TENTH or d > 7):
            return 0, False
        acc = acc * 10 + d
        digits += 1
        if frac >= 0:
            frac += 1
    if digits == 0:
        return 0, False
    scale = 8 - (frac if frac > 0 else 0)
    for _ in range(scale):
        if acc > _MAX_TENTH:
            return 0, False
        acc *= 10
    return (-acc if neg else acc), True


@njit(cache=True, _nrt=False)
def _num(chars, a, n):
    v = 0
    for j in range(a, a + n):
        d = chars[j] - 48
        if d < 0 or d > 9:
            return -1
        v = v * 10 + d
    return v


@njit(cache=True, _nrt=False)
def _days_in_month(year, month):
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month == 4 or month == 6 or month == 9 or month == 11 else 31


@njit(cache=True)
def _times(offsets, chars, valid, out, parsed):
    for i in range(out.shape[0]):
        if not valid[i]:
            continue
        ns, ok = time_at(chars, offsets[i], offsets[i + 1])
        if ok:
            out[i] = ns
            parsed[i] = True


@njit(cache=True, _nrt=False)
def time_at(chars, a, b):
    """RFC 3339 UTC ``chars[a:b]`` -> (ns since the epoch, ok); see :func:`parse_times`."""
    if b - a < 20 or chars[a + 4] != 45 or chars[a + 7] != 45 or chars[a + 10] != 84:  # YYYY-MM-DDT
        return 0, False
    if chars[a + 13] != 58 or chars[a + 16] != 58 or chars[b - 1] != 90:  # HH:MM:SS ... Z
        return 0, False
    year, month, day = _num(chars, a, 4), _num(chars, a + 5, 2), _num(chars, a + 8, 2)
    hour, minute, second = _num(chars, a + 11, 2), _num(chars, a + 14, 2), _num(chars, a + 17, 2)
    if year < 1900 or year > 2199 or not (1 <= month <= 12) or hour < 0 or hour > 23:
        return 0, False  # other years: the slow path (int64 ns only reach 1677..2262)
    if day < 1 or day > _days_in_month(year, month):
        return 0, False
    if minute < 0 or minute > 59 or second < 0 or second > 60:
        return 0, False
    nanos = 0
    j = a + 19
    if j < b - 1:
        if chars[j] != 46 or b - 1 - (j + 1) > 9 or b - 1 == j + 1:
            return 0, False
        digits = b - 1 - (j + 1)
        nanos = _num(chars, j + 1, digits)
        if nanos < 0:
            return 0, False
        for _ in range(9 - digits):
            nanos *= 10
    # days from 1970-01-01 (proleptic Gregorian)
    y = year - (1 if month <= 2 else 0)
    era = y // 400
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return ((days * 24 + hour) * 60 + minute) * 60_000_000_000 + second * 1_000_000_000 + nanos, True
