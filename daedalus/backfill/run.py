"""``daedalus etl --dask local:N|tcp://HOST:8786``: plan, fan out, commit (see :mod:`daedalus.backfill`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from daedalus.backfill import tasks
from daedalus.backfill.scratch import Scratch, forget
from daedalus.backfill.state import merge_states, product_state
from daedalus.backfill.targets import LocalTarget, StoreTarget, Target
from daedalus.capture.segments import write_atomically
from daedalus.config import DaedalusConfig
from daedalus.etl.job import EtlJob, Summary
from daedalus.etl.state import EtlState, load_state, save_state
from daedalus.logs import get_logger

log = get_logger("daedalus.backfill")
GROUP_BYTES = 64 << 20  # raw bytes per task: tasks of seconds, not milliseconds
NOTE = "commit.json"
# Dask's statistical profiler samples every worker's stacks every 10 ms: measurable CPU on
# tasks that run for seconds, and nobody reads its profiles here.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False}
PER_PRODUCT_CHANNELS = ("level2", "book_snapshot", "market_trades", "bars")


class BackfillError(RuntimeError):
    """The backfill cannot run as configured, or a task failed for good."""


def groups(items: list[dict[str, Any]], target_bytes: int) -> list[list[dict[str, Any]]]:
    """Consecutive items in runs of about ``target_bytes`` raw bytes (at least one each)."""
    out: list[list[dict[str, Any]]] = []
    size = target_bytes
    for item in items:
        if size >= target_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += int(item["bytes"])
    return out


@contextlib.contextmanager
def dask_client(address: str, scratch: Path) -> Iterator[Any]:
    """``local:N``: a LocalCluster of N worker processes (one thread each, their spill space
    under the scratch folder); anything else: the address of a running scheduler."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise BackfillError("--dask needs Dask: pip install 'daedalus[dask]' (dask and distributed)") from None
    if address.startswith("local:"):
        try:
            workers = int(address.removeprefix("local:"))
        except ValueError:
            raise BackfillError(f"--dask {address!r}: expected local:N (N workers) or tcp://HOST:PORT") from None
        if not 1 <= workers <= 256:
            raise BackfillError(f"--dask {address!r}: N must be 1..256")
        space = scratch / "dask-worker-space"
        with dask.config.set(QUIET_WORKERS):  # the nannies hand this configuration to their workers
            # loopback only; the scheduler's HTTP server (health, metrics) on a free port, never on
            # 8787, where `daedalus run` serves its status page
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", local_directory=str(space),
                                   silence_logs=40)  # fmt: skip
            with cluster, Client(cluster) as client:
                yield client
    else:
        try:
            client = Client(address, timeout=30)
        except (OSError, ValueError) as exc:
            raise BackfillError(f"--dask {address}: cannot reach the scheduler ({exc})") from None
        with client:
            yield client


class Backfill:
    """One source's pending segments through the two phases, then one commit."""

    def __init__(self, config: DaedalusConfig, source: str, *, raw: str | None = None, processed: str | None = None,
                 scratch: str | None = None) -> None:  # fmt: skip
        if source != "coinbase":
            raise BackfillError(f"--dask: the backfill splits Coinbase segments only (its per-product chains "
                                f"know their frames); run `daedalus etl` without --dask for {source}")  # fmt: skip
        for channel in PER_PRODUCT_CHANNELS:
            cols = _channel(config, channel).partition_cols
            if "product_id" not in cols:
                raise BackfillError(f"--dask: etl.channels.{channel}.partition_cols must include product_id "
                                    f"(one file per product and segment; it is {list(cols)})")  # fmt: skip
        self.config = config
        self.source = source
        self.job = EtlJob(config, source)
        # one scratch folder per (input, output, ETL settings): a rerun reuses only work done for
        # the same ones, and two backfills with different outputs never share one
        where = json.dumps([raw, processed, config.etl.model_dump(mode="json")], sort_keys=True)
        self.scratch = config.layout.scratch(f"backfill-{source}-{_digest(where)[:12]}")
        # the tasks' shared work area: this folder, or an s3:// prefix for workers on other machines
        location = str(self.scratch) if scratch is None else f"{scratch.rstrip('/')}/{self.scratch.name}"
        self.area = Scratch(location, config)
        self._start_arrays: dict[str, Any] | None = None
        self.target: Target = (LocalTarget(config, self.job) if raw is None and processed is None else
                               StoreTarget(config, self.job, self.scratch, raw=raw or str(config.layout.raw),
                                           processed=processed or str(config.processed_dir)))  # fmt: skip

    # ---- planning -------------------------------------------------------------------------
    def plan(self, start: date | None, end: date | None) -> list[dict[str, Any]]:
        """The pending segments, in order, that the backfill takes."""
        self.target.prepare()
        return self.target.pending(start, end)

    # ---- running --------------------------------------------------------------------------
    def run(self, address: str, start: date | None = None, end: date | None = None, progress: bool = False) -> Summary:
        started = time.perf_counter()
        self.target.prepare()
        try:
            return self._run(address, start, end, progress, started)
        finally:
            self.target.close()

    def _run(self, address: str, start: date | None, end: date | None, progress: bool, started: float) -> Summary:
        note = self.scratch / NOTE
        if note.exists() and not self._note_applies(json.loads(note.read_bytes())):
            log.warning("backfill_note_discarded", note=str(note), effect="the checkpoint moved on since (another "
                        "ETL ran): planned again from it")  # fmt: skip
            shutil.rmtree(self.scratch, ignore_errors=True)
        if not note.exists():  # else: a commit was cut short; finish it first
            items = self.plan(start, end)
            if not items:
                shutil.rmtree(self.scratch, ignore_errors=True)  # what a killed run left, if the segments went since
                return Summary()
            self.scratch.mkdir(parents=True, exist_ok=True)
            with dask_client(address, self.scratch) as client:
                warm = client.run(tasks.warm_up, self.config, self.source, str(self.scratch))
                log.info("backfill_started", segments=len(items), mb=round(sum(i["bytes"] for i in items) / 1e6, 1),
                         workers=len(warm), scheduler=client.scheduler.address,
                         cluster_seconds=round(time.perf_counter() - started, 3),
                         warm_up_seconds=round(max(warm.values(), default=0.0), 3))  # fmt: skip
                parsed, chains = self._fan_out(client, items, progress)
                if self.area.remote:  # the workers' downloads of the S3 work area
                    client.run(forget, self.area.location)
                log.info("backfill_parsed", segments=len(parsed), reused=sum(bool(r.get("reused")) for r in parsed),
                         quarantined_segments=sum("quarantined_segment" in r for r in parsed),
                         task_seconds=round(sum(r.get("seconds", 0.0) for r in parsed), 3),
                         task_cpu_seconds=round(sum(r.get("cpu_seconds", 0.0) for r in parsed), 3))  # fmt: skip
                spent = {c["product"]: self._chain_seconds(c["groups"]) for c in chains}
                cpu = {c["product"]: self._chain_seconds(c["groups"], "cpu_seconds") for c in chains}
                log.info("backfill_books_done", chains=len(chains),
                         task_seconds=round(sum(spent.values()), 3),
                         critical_path_seconds=round(max(spent.values(), default=0.0), 3),
                         chain_cpu_seconds={p: round(v, 3) for p, v in cpu.items()})  # fmt: skip
            self.write_note(parsed, chains)
        record = json.loads(note.read_bytes())
        summary = self._commit(record["parsed"], record["chains"])
        summary.seconds = time.perf_counter() - started
        self.area.remove()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return summary

    def write_note(self, parsed: list[dict[str, Any]], chains: list[dict[str, Any]]) -> None:
        """What the commit does, before it starts: the parse results, the chains, and the
        checkpoint's last segment before and after it."""
        live = [r["key"] for r in parsed if "quarantined_segment" not in r]
        before = self.target.start_state().last_segment
        record = {"parsed": parsed, "chains": chains, "before": before, "after": live[-1] if live else before}
        write_atomically(self.scratch / NOTE, json.dumps(record).encode())

    def _note_applies(self, record: dict[str, Any]) -> bool:
        """A commit note is finished only if the checkpoint is still the one it started from,
        or already the one it saves: if another ETL committed in between, finishing it would
        put an older checkpoint back."""
        return self.target.start_state().last_segment in (record.get("before"), record.get("after"))

    def _fan_out(self, client: Any, items: list[dict[str, Any]],
                 progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
        """Both phases, overlapped: every segment group's parse task is submitted at once; as
        their results arrive, in order, each product's chain is extended by that group (a
        product first met in group g gets a chain from group 0: the connections' sequence
        positions come from every segment). Chain tasks have the higher priority, so books
        start while later segments are still being parsed, and the workers stay busy.

        Returns the parse results, in order, and per product ``{"product", "groups": [folder,
        ...]}``. A group's folder is named after everything its result depends on (the
        previous folder's name and its segments' keys), so a rerun reuses exactly the finished
        work of the same plan, never a group of an older plan that covered other segments."""
        start = self.target.start_state()
        token = uuid.uuid4().hex[:8]  # task keys unique to this run (a long-lived scheduler remembers old ones)
        batches = groups(items, GROUP_BYTES)
        pending = [client.submit(tasks.parse_segments, self.config, self.source, self.area.location,
                                 [{k: v for k, v in item.items() if k != "bytes"} for item in batch],
                                 key=f"parse-{token}-{batch[0]['id']}", pure=False) for batch in batches]  # fmt: skip
        parsed: list[dict[str, Any]] = []
        runs: list[list[dict[str, Any]]] = []  # the chains' groups: each parse group's live segments
        chains: dict[str, dict[str, Any]] = {}
        bar = _Bar("parse", len(items)) if progress else None
        try:
            for future in pending:
                results = _result(future, "parse")
                parsed += results
                if bar is not None:
                    bar.advance(len(results))
                live = [r for r in results if "quarantined_segment" not in r]
                if not live:
                    continue
                runs.append(live)
                for product in _products(start if len(runs) == 1 else None, live):
                    if product not in chains:
                        chains[product] = self._new_chain(product, start)
                        for number in range(len(runs) - 1):  # catching up with the groups before
                            self._extend(client, chains[product], number, runs[number], token)
                for chain in chains.values():
                    self._extend(client, chain, len(runs) - 1, live, token)
            if runs and not chains:  # no product at all: one chain keeps the connections' sequence positions
                chains[""] = self._new_chain("", start)
                for number, run in enumerate(runs):
                    self._extend(client, chains[""], number, run, token)
        finally:
            if bar is not None:
                bar.close()
        for chain in chains.values():
            _result(chain["tail"], "books")
        return parsed, [{"product": p, "groups": c["groups"]} for p, c in chains.items()]

    def _new_chain(self, product: str, start: EtlState) -> dict[str, Any]:
        home = f"chain/p-{_digest(product)}"
        tail = self._initial(home, product, start)
        return {"product": product, "home": home, "tail": tail, "groups": [],
                "name": "fresh" if tail is None else tail.rsplit("/", 1)[-1]}  # fmt: skip

    def _extend(self, client: Any, chain: dict[str, Any], number: int, run: list[dict[str, Any]], token: str) -> None:
        chain["name"] = f"g{number:06d}-{_digest(chain['name'], *(item['key'] for item in run))}"
        chain["groups"].append(f"{chain['home']}/{chain['name']}")
        chain["tail"] = client.submit(tasks.run_chain, self.config, self.source, self.area.location, chain["product"],
                                      chain["groups"][-1], run, chain["tail"],
                                      key=f"chain-{token}-{chain['home'].rsplit('/', 1)[-1]}-{number}", pure=False,
                                      priority=1)  # fmt: skip

    def _initial(self, home: str, product: str, start: EtlState) -> str | None:
        """The checkpoint's part for this product's chain, as a folder of the work area (None:
        nothing to carry)."""
        if start.last_segment is None and not start.books.products:
            return None
        if self._start_arrays is None:  # cut once, not once per product
            self._start_arrays = start.books.to_arrays()
        state = product_state(start, product, self.job.sample_ns, self.job.depth, self.job.bar_ns,
                              self._start_arrays)  # fmt: skip
        state.last_segment = start.last_segment
        key = f"{home}/start-{_digest(str(start.last_segment), json.dumps(start.totals, sort_keys=True))}"
        local = self.scratch / key
        if not (local / f"{tasks.CHAIN_STATE}.json").exists():
            save_state(local, tasks.CHAIN_STATE, state)
            self.area.save_state_folder(local, key)
        return key

    # ---- commit ---------------------------------------------------------------------------
    def _commit(self, parsed: list[dict[str, Any]], chains: list[dict[str, Any]]) -> Summary:
        """Outputs into place, the merged checkpoint, then the segments recorded as committed
        (and, in the data directory, deleted or archived). Every step can be repeated: the
        note stays until the end."""
        groups_done = [self._finished(group) | {"folder": group} for chain in chains for group in chain["groups"]]
        summary, totals = Summary(), Counter()
        for result in parsed:
            self._place(f"parse/{result['id']}", result["files"])
            whole = "quarantined_segment" in result  # as the sequential run counts it: not a segment processed
            summary.segments += not whole
            summary.bytes += 0 if whole else int(result["bytes"])
            summary.quarantined_lines += int(result.get("quarantined", 0))
            summary.quarantined_segments += whole
        for result in [*parsed, *groups_done]:
            summary.rows.update(result["rows"])
            totals.update(result["counts"])
        for group in groups_done:
            self._place(group["folder"], group["files"])
        summary.counts.update(totals)
        live = [r["key"] for r in parsed if "quarantined_segment" not in r]
        if live:
            self.target.save_checkpoint(self._merged(parsed, chains, dict(totals), live[-1]), live)
        self.target.finish(parsed)
        return summary

    def _merged(self, parsed: list[dict[str, Any]], chains: list[dict[str, Any]], totals: dict[str, int],
                last: str) -> EtlState:  # fmt: skip
        """The checkpoint after the backfill, computed once from the checkpoint before it and
        kept in the scratch folder: a repeated commit (the first was cut short after saving
        it) must not add the chains to it a second time."""
        folder = self.scratch / "merged"
        if (folder / f"{self.source}.json").exists():
            return self._load_from(folder, self.source)
        start = self.target.start_state()
        last_group = {c["product"]: c["groups"][-1] for c in chains}

        def load(product: str) -> EtlState:
            return self._load_from(self.area.state_folder(last_group[product], tasks.CHAIN_STATE), tasks.CHAIN_STATE)

        merged = merge_states(start, list(last_group), load, _book_products(start, parsed), _conns(start, parsed),
                              totals, last)  # fmt: skip
        save_state(folder, self.source, merged)
        return merged

    def _chain_seconds(self, folders: list[str], measure: str = "seconds") -> float:
        """The task seconds (or ``cpu_seconds``) of one product's chain, all its groups: the
        longest chain bounds the backfill."""
        return sum(self._finished(g).get(measure, 0.0) for g in folders)

    def _finished(self, key: str) -> dict[str, Any]:
        done = self.area.finished(key)
        if done is None:
            raise BackfillError(f"{self.area.location}/{key}: a finished task's result is missing")
        return done

    def _place(self, key: str, files: list[str]) -> None:
        """A task folder's files into the target (fetched first from an S3 work area)."""
        self.target.place(self.area.folder(key, [f"data/{rel}" for rel in files]), files)

    def _load_from(self, folder: Path, name: str) -> EtlState:
        return load_state(folder, name, self.job.sample_ns, self.job.depth, self.job.bar_ns)


def _channel(config: DaedalusConfig, channel: str) -> Any:
    return getattr(config.etl.channels, channel)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _products(start, parsed: list[dict[str, Any]]) -> list[str]:  # type: ignore[no-untyped-def]
    """The products a chain is needed for, in order: the checkpoint's (``start``; None: skip)
    and those of the ``parsed`` segments."""
    out: list[str] = []
    if start is not None:
        out = list(start.books.products)
        for name in [*start.trades.seen, *(p for p, _ in start.bars.open_bars), *start.bars.written_until]:
            if name not in out:
                out.append(name)
    for result in parsed:
        for name in [*result["products"], *result["trade_products"]]:
            if name not in out:
                out.append(name)
    return out


def _book_products(start, parsed: list[dict[str, Any]]) -> list[str]:  # type: ignore[no-untyped-def]
    out = list(start.books.products)
    for result in parsed:
        out += [p for p in result["book_products"] if p not in out]
    return out


def _conns(start, parsed: list[dict[str, Any]]) -> list[int]:  # type: ignore[no-untyped-def]
    out = list(start.books.conns)
    for result in parsed:
        out += [c for c in result["conns"] if c not in out]
    return out


def _result(future: Any, phase: str) -> Any:
    """A task's result; its failure (after Dask's retries of a lost worker) as a BackfillError."""
    try:
        return future.result()
    except Exception as exc:  # the task's own exception, or KilledWorker
        raise BackfillError(f"a {phase} task failed: {exc!r}") from exc


class _Bar:
    """A rich progress bar over segments parsed (only when asked for: on a terminal)."""

    def __init__(self, phase: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(phase), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.bar.add_task(phase, total=total)
        self.bar.start()

    def advance(self, done: int) -> None:
        self.bar.update(self.task, advance=done)

    def close(self) -> None:
        self.bar.stop()
