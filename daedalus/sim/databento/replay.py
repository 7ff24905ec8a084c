"""Records of a DBN file (``.dbn`` or ``.dbn.zst``, any DBN version) to serve in live-style sessions.

Why load it whole: replay files are test fixtures and short captures; the gateway filters the
records per session by schema (rtype) and instrument, in file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import databento_dbn as dbn

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RTYPE_SYMBOL_MAPPING = 22
_SKIP_RTYPES = {21, 22, 23}  # error, symbol mapping, system: the gateway makes its own


class ReplayError(ValueError):
    """The replay file cannot be read as DBN."""


@dataclass
class ReplayFile:
    path: Path
    dataset: str
    records: list[tuple[int, int, bytes]] = field(default_factory=list)  # (rtype, instrument_id, bytes)
    symbols: dict[str, int] = field(default_factory=dict)  # raw symbol -> instrument id
    first_ts: int = 0


def _strip_ts_out(raw: bytes) -> bytes:
    return bytes((raw[0] - 2,)) + raw[1:-8]


def load_replay(path: Path) -> ReplayFile:
    """Decode the whole file (upgraded to DBN v3) and collect its symbol -> instrument id mappings."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
    compression = dbn.Compression.ZSTD if data.startswith(ZSTD_MAGIC) else dbn.Compression.NONE
    decoder = dbn.DBNDecoder(upgrade_policy=dbn.VersionUpgradePolicy.UPGRADE_TO_V3, compression=compression)
    try:
        decoder.write(data)
        items = decoder.decode()
    except Exception as exc:
        raise ReplayError(f"{path} is not a DBN stream: {exc}") from None
    if not items or not isinstance(items[0], dbn.Metadata):
        raise ReplayError(f"{path} has no DBN metadata")
    meta = items[0]
    out = ReplayFile(path, meta.dataset)
    for raw_symbol, intervals in (meta.mappings or {}).items():
        for interval in intervals:
            sym = interval["symbol"] if isinstance(interval, dict) else interval.symbol
            if str(sym).isdigit():
                out.symbols[raw_symbol] = int(sym)
    for record in items[1:]:
        rtype = int(record.rtype)
        if rtype == _RTYPE_SYMBOL_MAPPING:
            out.symbols[record.stype_out_symbol] = record.instrument_id
        if rtype in _SKIP_RTYPES:
            continue
        raw = bytes(record)
        if meta.ts_out:
            raw = _strip_ts_out(raw)
        out.records.append((rtype, record.instrument_id, raw))
    out.first_ts = meta.start or 0
    return out
