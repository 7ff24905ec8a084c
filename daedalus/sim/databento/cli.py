"""``daedalus sim --protocol databento``: build the config from the flags, serve, print the ready line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from daedalus.exitcodes import FAILED, NEEDS_OPERATOR
from daedalus.sim.checks import SimConfigError
from daedalus.sim.databento.gateway import TEST_API_KEY, DatabentoGateway, GatewayConfig, serve
from daedalus.sim.databento.replay import ReplayError


def run_gateway(
    *,
    host: str,
    port: int,
    symbols: str | None,
    dataset: str,
    api_key: str | None,
    rate: float | None,
    seed: int,
    replay: Path | None,
    truth: Path | None,
    history: int,
    disconnect_after_s: float | None,
    disconnect_after_records: int | None,
    slow_reader_bytes: int,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code (0, or NEEDS_OPERATOR/FAILED with a message on stderr)."""
    names = tuple(s.strip() for s in symbols.split(",") if s.strip()) if symbols else GatewayConfig.symbols
    config = GatewayConfig(
        host=host,
        port=port,
        api_key=api_key or TEST_API_KEY,
        dataset=dataset,
        symbols=names,
        seed=seed,
        rate=rate,
        replay=replay,
        truth=truth,
        history=history,
        disconnect_after_s=disconnect_after_s,
        disconnect_after_records=disconnect_after_records,
        slow_reader_bytes=slow_reader_bytes,
    )
    try:
        config.validate()
    except SimConfigError as exc:
        print(f"{exc.flag}: {exc}", file=sys.stderr)
        return NEEDS_OPERATOR

    def ready(gw: DatabentoGateway) -> None:
        mode = f"replay={replay}" if replay else f"rate={rate or 'max'} seed={seed}"
        print(
            f"daedalus sim ready protocol=databento gateway={host} port={gw.port} dataset={gw.dataset} "
            f"symbols={','.join(gw._symbols)} key=...{config.api_key[-5:]} {mode}",
            flush=True,
        )

    try:
        asyncio.run(serve(config, ready))
    except KeyboardInterrupt:
        pass
    except ReplayError as exc:
        print(f"--replay {replay}: {exc}", file=sys.stderr)
        return NEEDS_OPERATOR
    except OSError as exc:
        print(f"cannot serve on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return FAILED
    return 0
