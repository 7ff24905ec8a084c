"""DBN v3 record builders: model events -> record bytes per schema (encoded with ``databento_dbn``).

Each builder returns a list of whole records (``bytes``), without ``ts_out``;
:func:`with_ts_out` appends it per session (the record length grows by 8 bytes, which is
exactly what DBN does for ``ts_out=1``), so one encoding per event serves every session.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import databento_dbn as dbn

from daedalus.sim.databento.model import F_LAST, LEVEL, Event, Instrument, MboUpdate

SCHEMAS = ("mbo", "mbp-1", "mbp-10", "trades", "ohlcv-1m", "definition")
# rtype of each schema's records, used to filter replayed files
SCHEMA_RTYPES = {
    "mbo": (160,),
    "mbp-1": (1,),
    "mbp-10": (10,),
    "trades": (0,),
    "tbbo": (1,),
    "ohlcv-1s": (32,),
    "ohlcv-1m": (33,),
    "ohlcv-1h": (34,),
    "ohlcv-1d": (35,),
    "definition": (19,),
    "statistics": (24,),
    "status": (18,),
    "imbalance": (20,),
}
PUBLISHER_ID = 1  # GLBX.MDP3 on Databento's publisher table
UNDEF_TIMESTAMP = 2**64 - 1
_ACTIONS = {a: dbn.Action(a) for a in "ATFCMRN"}
_SIDES = {s: dbn.Side(s) for s in "BAN"}
_TS_OUT = struct.Struct("<Q")


def with_ts_out(record: bytes, ts_out: int) -> bytes:
    """The record as sent with ``ts_out=1``: length (in 4-byte words) + 2, ts_out appended."""
    return bytes((record[0] + 2,)) + record[1:] + _TS_OUT.pack(ts_out)


def mbo_record(ev: Event, u: MboUpdate) -> bytes:
    return bytes(
        dbn.MBOMsg(
            PUBLISHER_ID,
            ev.instrument_id,
            ev.ts_event,
            u.order_id,
            u.price,
            u.size,
            _ACTIONS[u.action],
            _SIDES[u.side],
            ev.ts_recv,
            flags=u.flags,
            ts_in_delta=ev.ts_in_delta,
            sequence=u.sequence,
        )
    )


def mbo(ev: Event) -> list[bytes]:
    return [mbo_record(ev, u) for u in ev.updates]


def trades(ev: Event) -> list[bytes]:
    ts = [u for u in ev.updates if u.action == "T"]
    out = []
    for i, u in enumerate(ts):
        flags = F_LAST if i == len(ts) - 1 else 0
        msg = dbn.TradeMsg(
            PUBLISHER_ID,
            ev.instrument_id,
            ev.ts_event,
            u.price,
            u.size,
            _ACTIONS["T"],
            _SIDES[u.side],
            0,
            ev.ts_recv,
            flags=flags,
            ts_in_delta=ev.ts_in_delta,
            sequence=u.sequence,
        )
        out.append(bytes(msg))
    return out


def _mbp(ev: Event, depth: int) -> list[bytes]:
    """One MBP record per book change or trade, with the top ``depth`` levels after it; F_LAST on the last."""
    ups = [u for u in ev.updates if u.levels is not None]
    out = []
    cls = dbn.MBP1Msg if depth == 1 else dbn.MBP10Msg
    for i, u in enumerate(ups):
        assert u.levels is not None
        pairs = [dbn.BidAskPair(*lvl) for lvl in LEVEL.iter_unpack(u.levels[: depth * LEVEL.size])]
        msg = cls(
            PUBLISHER_ID,
            ev.instrument_id,
            ev.ts_event,
            u.price,
            u.size,
            _ACTIONS[u.action],
            _SIDES[u.side],
            u.depth,
            ev.ts_recv,
            flags=F_LAST if i == len(ups) - 1 else 0,
            ts_in_delta=ev.ts_in_delta,
            sequence=u.sequence,
            levels=pairs[0] if depth == 1 else pairs,
        )
        out.append(bytes(msg))
    return out


def mbp1(ev: Event) -> list[bytes]:
    return _mbp(ev, 1)


def mbp10(ev: Event) -> list[bytes]:
    return _mbp(ev, 10)


def ohlcv_1m(ev: Event) -> list[bytes]:
    b = ev.bar
    if b is None:
        return []
    msg = dbn.OHLCVMsg(
        dbn.RType.OHLCV_1M, PUBLISHER_ID, ev.instrument_id, b.ts_event, b.open, b.high, b.low, b.close, b.volume
    )
    return [bytes(msg)]


BUILDERS: dict[str, Callable[[Event], list[bytes]]] = {
    "mbo": mbo,
    "mbp-1": mbp1,
    "mbp-10": mbp10,
    "trades": trades,
    "ohlcv-1m": ohlcv_1m,
    "definition": lambda ev: [],  # sent once per subscription, see definition()
}


def event_records(ev: Event, schema: str) -> list[bytes]:
    """The event's records in ``schema`` (cached on the event: every session shares one encoding)."""
    cached = ev.cache.get(schema)
    if cached is None:
        cached = ev.cache[schema] = BUILDERS[schema](ev)
    return cached


def definition(inst: Instrument, ts: int) -> bytes:
    """An InstrumentDefMsg for a futures-like (or equity-like) instrument."""
    future = inst.tick == 250_000_000
    msg = dbn.InstrumentDefMsg(
        PUBLISHER_ID,
        inst.instrument_id,
        ts,
        ts,
        inst.tick,
        1_000_000_000,
        inst.symbol,
        inst.symbol[:-2] if future else inst.symbol,
        "FUT" if future else "STK",
        dbn.InstrumentClass.FUTURE if future else dbn.InstrumentClass.STOCK,
        dbn.SecurityUpdateAction.ADD,
        currency="USD",
        exchange="XCME" if future else "XNAS",
    )
    return bytes(msg)


def snapshot_records(inst: Instrument, updates: list[MboUpdate], ts_event: int, ts_recv: int) -> list[bytes]:
    ev = Event(inst.instrument_id, ts_event, ts_recv, 0, updates)
    return mbo(ev)


def symbol_mapping(instrument_id: int, stype_in_symbol: str, symbol: str, ts: int) -> bytes:
    """One mapping as the live gateway sends it (stype in/out None = 0xFF, open-ended interval).

    The encoder wants an SType, so the two stype bytes (offsets 16 and 88) are patched to 0xFF
    afterwards, which is what Databento's LIVE fixture holds."""
    st = dbn.SType.RAW_SYMBOL
    msg = dbn.SymbolMappingMsg(0, instrument_id, ts, st, stype_in_symbol, st, symbol, UNDEF_TIMESTAMP, UNDEF_TIMESTAMP)
    raw = bytearray(bytes(msg))
    raw[16] = raw[88] = 0xFF
    return bytes(raw)


def system(ts: int, msg: str, code: dbn.SystemCode) -> bytes:
    return bytes(dbn.SystemMsg(ts, msg, code=code))


def error(ts: int, err: str, code: dbn.ErrorCode) -> bytes:
    return bytes(dbn.ErrorMsg(ts, err, is_last=True, code=code))


def live_metadata(dataset: str, start: int, ts_out: bool) -> bytes:
    """The header of a live session: mixed schema, no stype_in, stype_out instrument_id, no symbols."""
    meta = dbn.Metadata(dataset, start, None, dbn.SType.INSTRUMENT_ID, None, ts_out=ts_out)
    return bytes(meta.encode())
