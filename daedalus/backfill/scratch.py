"""The backfill's shared work area (``--scratch``): a directory every worker reaches (one
machine, or a shared filesystem) or an ``s3://`` prefix (workers on separate machines).

A task's work is a *folder* named by a key (``parse/<segment>``, ``chain/<product>/<group>``).
A task builds it in a local temporary folder and publishes it whole: a directory is renamed
into place; on S3 every file is uploaded and ``result.json`` last, so a folder counts as
finished exactly when its result is there, whatever killed its task before. Readers get a
local path to a folder's files (the folder itself, or a cached download)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from daedalus.config import DaedalusConfig
from daedalus.storage import Store, is_url, open_store, sha256_file

RESULT = "result.json"


class Scratch:
    def __init__(self, location: str, config: DaedalusConfig) -> None:
        self.location = location
        self.store: Store | None = open_store(location, config.sync) if is_url(location) else None
        self.root = Path(location)
        # this machine's own space for an S3 scratch area: temporary folders and downloads
        self.work = config.layout.scratch(f"backfill-work-{uuid.uuid4().hex[:8]}") if self.store else self.root

    @property
    def remote(self) -> bool:
        return self.store is not None

    def finished(self, key: str) -> dict[str, Any] | None:
        """The result of a folder finished earlier (a rerun reuses it), marked ``reused``."""
        if self.store is None:
            result = self.root / key / RESULT
            data = result.read_bytes() if result.exists() else None
        else:
            data = self.store.read(f"{key}/{RESULT}")
        return json.loads(data) | {"reused": True} if data is not None else None

    def new_folder(self, key: str) -> Path:
        """A fresh local folder to build ``key`` in."""
        tmp = (self.root / f"{key}.tmp-{uuid.uuid4().hex[:8]}") if self.store is None else (
            self.work / "build" / uuid.uuid4().hex)  # fmt: skip
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, tmp: Path, key: str, result: dict[str, Any]) -> dict[str, Any]:
        """Make ``tmp`` the folder ``key``, its result written last. A twin that finished first
        (Dask ran the task again after losing its worker) wins: this one is dropped."""
        (tmp / RESULT).write_text(json.dumps(result))
        if self.store is None:
            try:
                tmp.rename(self.root / key)
            except OSError:
                done = self.finished(key)
                if done is None:  # not a finished twin in the way: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return done
            return result
        for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != RESULT):
            self.store.upload(path, f"{key}/{path.relative_to(tmp).as_posix()}", sha256_file(path))
        self.store.upload(tmp / RESULT, f"{key}/{RESULT}", sha256_file(tmp / RESULT))
        shutil.rmtree(tmp, ignore_errors=True)
        return result

    def folder(self, key: str, files: list[str]) -> Path:
        """A local path holding ``files`` (relative names) of the folder ``key``."""
        if self.store is None:
            return self.root / key
        local = self.work / "cache" / key
        for rel in files:
            target = local / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                self.store.download(f"{key}/{rel}", target)
        return local

    def state_folder(self, key: str, name: str) -> Path:
        """A local path holding a checkpoint (``<name>.json`` and the npz it names) of ``key``."""
        if self.store is None:
            return self.root / key
        local = self.folder(key, [f"{name}.json"])
        books = json.loads((local / f"{name}.json").read_bytes())["books_file"]
        return self.folder(key, [books])

    def save_state_folder(self, local: Path, key: str) -> None:
        """Put a checkpoint folder built locally at ``key`` (the chain's start)."""
        if self.store is None:
            return
        for path in sorted(p for p in local.iterdir() if p.is_file()):
            self.store.upload(path, f"{key}/{path.name}", sha256_file(path))

    def remove(self) -> None:
        """Everything of this backfill's work area (after the commit)."""
        if self.store is not None:
            for entry in list(self.store.list("")):
                self.store.delete(entry.key)
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


_SCRATCHES: dict[str, Scratch] = {}


def scratch_for(location: str, config: DaedalusConfig) -> Scratch:
    """The same :class:`Scratch` for every task of a worker process (one S3 client, one local
    work folder)."""
    if not is_url(location):
        return Scratch(location, config)
    found = _SCRATCHES.get(location)
    if found is None:
        found = _SCRATCHES[location] = Scratch(location, config)
    return found


def forget(location: str) -> None:
    """Drop this process's local work folder for ``location`` (run on every worker at the end)."""
    found = _SCRATCHES.pop(location, None)
    if found is not None:
        shutil.rmtree(found.work, ignore_errors=True)
