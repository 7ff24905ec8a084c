"""The processed dataset on S3 for ``daedalus query`` and ``daedalus plot``.

DuckDB's wheels carry no ``httpfs`` extension and an offline Pi cannot download it, so S3 is
read through a filesystem registered with DuckDB: pyarrow's own ``S3FileSystem`` (in the
pyarrow wheel already: no s3fs/aiobotocore, which pin botocore and can pull boto3 back to an
old release) wrapped by fsspec's ``ArrowFSWrapper``, whose protocol is ``s3``, so DuckDB hands
every ``s3://`` path (globs included) to it. The endpoint, region and keys are the config's
``sync:`` section, as for ``daedalus sync`` (both keys empty: the standard AWS credential chain).

Two ways to name the data, after the two local settings they mirror:

- a *data directory* on S3, ``--data-dir s3://bucket/prefix``: what ``daedalus sync`` uploads
  to ``sync.destination``, the processed dataset under ``<prefix>/processed/``;
- a *processed root*, ``--processed s3://bucket/prefix``: ``<source>/<channel>/<key>=<value>/...``
  right under the prefix, like ``etl.output_dir`` (and the ETL's ``s3://`` output).

Every failure (no such bucket, bad credentials, endpoint unreachable) is one
:class:`RemoteError` line naming the URL and the endpoint, never a credential.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from daedalus.logs import get_logger
from daedalus.query.api import QueryError

if TYPE_CHECKING:
    import duckdb
    from pyarrow.fs import S3FileSystem

    from daedalus.config import DaedalusConfig, SyncConfig
    from daedalus.query.views import Dataset

log = get_logger(__name__)

SCHEME = "s3://"
CONNECT_TIMEOUT = 5.0  # seconds; a wrong endpoint fails in seconds, not minutes
REQUEST_TIMEOUT = 60.0
MAX_ATTEMPTS = 3  # pyarrow's standard retry strategy: 5xx, throttling, connection errors
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)")
_REASONS = {
    "ACCESS_DENIED": "access denied (wrong keys, or the keys may not read this bucket)",
    "INVALID_ACCESS_KEY_ID": "bad credentials (the access key id is not known to the server)",
    "SIGNATURE_DOES_NOT_MATCH": "bad credentials (the secret access key does not match)",
    "NETWORK_CONNECTION": "cannot reach the endpoint",
    "NO_SUCH_BUCKET": "no such bucket",
    "MISSING_AUTHENTICATION_TOKEN": "no credentials (set sync.access_key_id/secret_access_key or AWS_* variables)",
}


class RemoteError(QueryError):
    """The S3 dataset cannot be read: one line for the user, no credential in it."""


def is_s3_url(text: object) -> bool:
    """``s3://...`` (a string, not a ``Path``, which would have folded ``//`` into ``/``)."""
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    """A bucket and a prefix (no leading or trailing ``/``) holding a processed dataset."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``s3://bucket/a/b/`` -> ``S3Location("bucket", "a/b")``; :class:`RemoteError` when malformed."""
        from daedalus.sync.s3 import parse_destination

        try:
            return cls(*parse_destination(url))
        except ValueError as exc:
            raise RemoteError(str(exc)) from None

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, f"{self.prefix}/{name}" if self.prefix else name)

    @property
    def path(self) -> str:
        """The path pyarrow's filesystem takes: ``bucket/prefix``."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    @property
    def url(self) -> str:
        return SCHEME + self.path

    def __str__(self) -> str:  # messages ("no processed data under s3://...") read like the local ones
        return self.url


ProcessedRoot = Path | S3Location


def processed_root(config: DaedalusConfig, data_dir: str | None = None, processed: str | None = None) -> ProcessedRoot:
    """Where the processed dataset is: ``processed`` (a directory or an S3 processed root), else
    ``data_dir`` (a data directory, or an S3 prefix as ``daedalus sync`` fills it: ``<prefix>/processed``),
    else the config's (which ``--data-dir DIR`` has already replaced)."""
    if processed is not None:
        return S3Location.parse(processed) if is_s3_url(processed) else Path(processed)
    if data_dir is not None and is_s3_url(data_dir):
        return S3Location.parse(data_dir).child("processed")
    return config.processed_dir


def endpoint_override(endpoint_url: str | None) -> tuple[str | None, str]:
    """``http://127.0.0.1:9000`` -> ``("127.0.0.1:9000", "http")``, as pyarrow takes it; None: AWS."""
    if not endpoint_url:
        return None, "https"
    parts = urlsplit(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"sync.endpoint_url: {endpoint_url!r} must be http(s)://host[:port]")
    return parts.netloc + parts.path.rstrip("/"), parts.scheme


def arrow_filesystem(sync: SyncConfig) -> S3FileSystem:
    """pyarrow's S3 filesystem for the ``sync:`` section: endpoint, region, keys (none: the AWS chain)."""
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    host, scheme = endpoint_override(sync.endpoint_url)
    key_id, secret = sync.access_key_id.get_secret_value(), sync.secret_access_key.get_secret_value()
    kwargs: dict[str, Any] = {"access_key": key_id, "secret_key": secret} if key_id or secret else {}
    if host is not None:
        kwargs |= {"endpoint_override": host, "scheme": scheme}
    if sync.region:
        kwargs["region"] = sync.region
    return S3FileSystem(connect_timeout=CONNECT_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
                        retry_strategy=AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS), **kwargs)  # fmt: skip


def _wrapper_class() -> type:
    """fsspec's wrapper, with ``find`` (what DuckDB's ``**`` glob calls) as one recursive listing:
    fsspec's default walks directory by directory, one LIST request per partition."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    class DuckDBArrowS3(ArrowFSWrapper):
        def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
                 **kwargs: Any) -> Any:  # fmt: skip
            if maxdepth is not None:
                return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
            from pyarrow.fs import FileSelector

            base = self._strip_protocol(path).rstrip("/")
            infos = self.fs.get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
            entries = {e["name"]: e for e in map(self._make_entry, infos) if withdirs or e["type"] == "file"}
            if withdirs and base and (top := self.info(base))["type"] == "directory":  # as fsspec does
                entries[top["name"]] = top
            found = dict(sorted(entries.items()))
            return found if detail else list(found)

    return DuckDBArrowS3


def register(con: duckdb.DuckDBPyConnection, fs: S3FileSystem) -> None:
    """Route DuckDB's ``s3://`` paths (``read_parquet`` and its globs) to ``fs``."""
    con.register_filesystem(_wrapper_class()(fs))


def describe(exc: BaseException, location: S3Location, sync: SyncConfig) -> RemoteError:
    """``exc`` (pyarrow's ``OSError``) as one line: the URL, why, the endpoint; keys scrubbed."""
    text = str(exc)
    code = match.group(1) if (match := _AWS_ERROR.search(text)) else ""
    reason = _REASONS.get(code) or " ".join(text.split())[:300]
    message = f"cannot read {location.url}: {reason} (endpoint {sync.endpoint_url or 'AWS'})"
    for secret in (sync.secret_access_key.get_secret_value(), sync.access_key_id.get_secret_value()):
        if secret:
            message = message.replace(secret, "***")
    return RemoteError(message)


def check_bucket(fs: S3FileSystem, location: S3Location, sync: SyncConfig) -> None:
    """One HEAD up front: listing a missing bucket returns nothing, which would read as "no data"."""
    from pyarrow.fs import FileType

    try:
        info = fs.get_file_info(location.bucket)
    except OSError as exc:
        raise _precise(fs, exc, location, sync) from None
    if info.type == FileType.NotFound:
        raise RemoteError(f"cannot read {location.url}: no such bucket (endpoint {sync.endpoint_url or 'AWS'})")


def _precise(fs: S3FileSystem, exc: OSError, location: S3Location, sync: SyncConfig) -> RemoteError:
    """A HEAD's 403 has no body, so it cannot tell a wrong secret from a missing permission: a LIST
    carries the server's error code (``SignatureDoesNotMatch``, ``InvalidAccessKeyId``, ...)."""
    if "ACCESS_DENIED" in str(exc):
        try:
            _listing(fs, location.path)
        except OSError as listed:
            return describe(listed, location, sync)
    return describe(exc, location, sync)


def _listing(fs: S3FileSystem, path: str) -> tuple[list[str], list[str]]:
    """(sorted subdirectory names, file names) directly under ``path`` (one delimited LIST)."""
    from pyarrow.fs import FileSelector, FileType

    dirs, files = [], []
    for info in fs.get_file_info(FileSelector(path, allow_not_found=True)):
        (dirs if info.type == FileType.Directory else files).append(info.base_name)
    return sorted(dirs), files


def _first_file_keys(fs: S3FileSystem, path: str) -> tuple[str, ...] | None:
    """The Hive keys on the path to the first ``*.parquet`` under ``path`` (depth first, sorted,
    like ``os.walk`` locally), so a dataset of many partitions is not listed whole."""
    dirs, files = _listing(fs, path)
    if any(name.endswith(".parquet") for name in files):
        return ()
    for name in dirs:
        keys = _first_file_keys(fs, f"{path}/{name}")
        if keys is not None:
            return ((name.split("=", 1)[0],) if "=" in name else ()) + keys
    return None


def find_datasets(fs: S3FileSystem, location: S3Location, sync: SyncConfig) -> list[Dataset]:
    """:func:`daedalus.query.views.find_datasets` over S3 listings: ``<source>/<channel>`` with a
    Parquet file, ``_``/``.`` names skipped; ``root`` is the dataset's ``s3://`` URL."""
    from daedalus.query.views import Dataset

    check_bucket(fs, location, sync)
    found: list[Dataset] = []
    try:
        for source in _visible(_listing(fs, location.path)[0]):
            for channel in _visible(_listing(fs, f"{location.path}/{source}")[0]):
                keys = _first_file_keys(fs, f"{location.path}/{source}/{channel}")
                if keys is not None:
                    found.append(Dataset(source, channel, f"{location.url}/{source}/{channel}", keys))
    except OSError as exc:
        raise describe(exc, location, sync) from None
    log.debug("query_s3_datasets", url=location.url, datasets=len(found))
    return found


def _visible(names: list[str]) -> list[str]:
    return [name for name in names if not name.startswith(("_", "."))]
