"""A local Databento live gateway (raw TCP API + DBN v3) with a ground-truth MBO market, replay and faults.

The official client connects to it unchanged::

    client = databento.Live(key=TEST_API_KEY, gateway="127.0.0.1", port=gw.port)

Protocol (Databento's live raw API): greeting ``lsg_version=``, ``cram=`` challenge, the client's
``auth=sha256(challenge|key)-<last 5 of key>|dataset=...|ts_out=|compression=|heartbeat_interval_s=``,
``success=1|session_id=N`` (or ``success=0|error=Authentication failed.``), subscription lines
(``schema``, ``stype_in`` raw_symbol/instrument_id, ``symbols``, ``snapshot``, ``start``), ``start_session``,
then one DBN v3 stream (one zstd stream with ``compression=zstd``): a live Metadata header (schema
None, stype_in None, stype_out instrument_id), per subscription a SymbolMappingMsg per instrument,
an ErrorMsg for symbols that do not resolve, a SUBSCRIPTION_ACK SystemMsg, definitions / an MBO
snapshot (``snapshot=1``) / the history from ``start`` (then REPLAY_COMPLETED), then live records.
Heartbeat SystemMsgs when idle for ``heartbeat_interval_s``.

Schemas from the model: mbo, mbp-1, mbp-10, trades, ohlcv-1m, definition (see :mod:`.model` for the
market rules). With ``replay=FILE.dbn[.zst]`` the file's records are served instead (any schema,
filtered by rtype and instrument), once per session, then REPLAY_COMPLETED and heartbeats.

In-process (async tests)::

    from daedalus.sim.databento import DatabentoGateway, GatewayConfig
    async with DatabentoGateway(GatewayConfig(symbols=("ESM6", "NQM6"), rate=2000, seed=7)) as gw:
        gw.port                                  # bound port (config port 0 = a free one)
        gw.instrument_id("ESM6")                 # stable per symbol (crc32-based)
        gw.true_top(iid)                         # (bid_px, bid_sz, ask_px, ask_sz), 1e-9 ints, UNDEF_PRICE if empty
        gw.model.levels(iid, 10)                 # the true top 10 levels
        gw.running.clear() / gw.running.set()    # pause / resume the market
        gw.step(n)                               # with market=False: generate n events by hand
        gw.sessions                              # GatewaySession objects: .stats (records, skipped, ...), .sent
        gw.history                               # the kept events (for start= replay)

Synchronous code (the official client blocks its caller, so the gateway needs its own loop)::

    from daedalus.sim.databento import ThreadedGateway
    with ThreadedGateway(GatewayConfig(keep_sent=True)) as tg:
        tg.port; tg.call(tg.gateway.true_top, iid)   # call() runs on the gateway's loop: no races

Child process: ``daedalus sim --protocol databento --port 0 --symbols ESM6,NQM6 --truth truth.ndjson``
prints ``daedalus sim ready protocol=databento gateway=127.0.0.1 port=N dataset=GLBX.MDP3 symbols=...``.

Truth file (``truth=``): one JSON line per MBO record the model generates, in order:
``{"instrument_id", "sequence", "ts_event", "bid_px", "bid_sz", "ask_px", "ask_sz"}`` (ints; the book
after that record), flushed after every batch of events.

Faults: ``disconnect_after_s`` / ``disconnect_after_records`` close each connection; a session whose
write buffer passes ``slow_reader_bytes`` gets a SLOW_READER_WARNING, its live records are skipped
(counted in ``session.stats.skipped``) until the buffer halves, then an ErrorMsg
SKIPPED_RECORDS_AFTER_SLOW_READING with the count; a wrong key gets ``auth_error``. A bad control
line gets an error (text before auth, an ErrorMsg after) and the connection closes.
The default key is ``TEST_API_KEY`` (``db-sim00000000000000000000000TEST``).
"""

from daedalus.sim.databento.gateway import TEST_API_KEY, DatabentoGateway, GatewayConfig, ThreadedGateway, serve
from daedalus.sim.databento.model import MarketModel, instrument_id_for
from daedalus.sim.databento.session import cram_reply

__all__ = [
    "TEST_API_KEY",
    "DatabentoGateway",
    "GatewayConfig",
    "MarketModel",
    "ThreadedGateway",
    "cram_reply",
    "instrument_id_for",
    "serve",
]
