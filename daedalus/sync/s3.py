"""The S3 client of ``daedalus sync``: destination parsing, a client that works with any
S3-compatible server, and error text with no credential in it."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config

from daedalus.config import SyncConfig

_DESTINATION = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?")
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


class SyncError(RuntimeError):
    """A permanent sync failure (access denied, no such bucket, bad credentials): one clear
    message, credentials scrubbed."""


def parse_destination(destination: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; the prefix has no leading or trailing ``/``."""
    match = _DESTINATION.fullmatch(destination)
    if match is None:
        raise ValueError(f"{destination!r} is not an s3://bucket[/prefix] URL")
    prefix = "/".join(part for part in (match.group(2) or "").split("/") if part)
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"{destination!r}: the prefix may not hold '.' or '..'")
    return match.group(1), prefix


def client_config(sync: SyncConfig, *, max_attempts: int = MAX_ATTEMPTS, connect_timeout: float = CONNECT_TIMEOUT,
                  read_timeout: float = READ_TIMEOUT) -> Config:  # fmt: skip
    """Checksums only when the operation needs them (boto3 >= 1.36 sends CRC32 by default,
    which MinIO, B2, Ceph and others reject); standard retries (capped backoff with jitter
    on 5xx, throttling, timeouts, connection errors)."""
    return Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max(10, sync.max_concurrency * 2),
        region_name=sync.region,
    )


def make_client(sync: SyncConfig, **config: Any) -> Any:
    """A boto3 S3 client for ``sync``: its endpoint, region and keys (both keys empty: the
    standard AWS credential chain)."""
    key_id = sync.access_key_id.get_secret_value()
    secret = sync.secret_access_key.get_secret_value()
    kwargs: dict[str, Any] = {}
    if key_id or secret:
        kwargs["aws_access_key_id"] = key_id
        kwargs["aws_secret_access_key"] = secret
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=sync.endpoint_url or None, region_name=sync.region or None,
        config=client_config(sync, **config), **kwargs,
    )  # fmt: skip


#: ``sink(operation, key, retries, body_bytes)``: one S3 call that needed ``retries`` > 0 retries;
#: ``key`` is None for calls on the bucket, ``body_bytes`` None when the body's size is unknown.
RetrySink = Callable[[str, "str | None", int, "int | None"], None]
_CONTEXT_KEY = "daedalus_sync_call"


class RetryObserver:
    """Counts botocore's own retries of each S3 call, exactly: botocore's retry loop keeps the
    attempt number in the call's context (``context["retries"]["attempt"]``), and the context
    reaches ``after-call`` (an answer, even a final 5xx) and ``after-call-error`` (connection
    refused or reset, timeouts) once per call, after its last attempt. The object key and the
    body size are noted on the context as the call begins (``provide-client-params``), so that a retry is
    charged to its file even when s3transfer makes the call on one of its own threads.

    One observer per client (:func:`observe_retries`); passes attach a sink for their run."""

    def __init__(self) -> None:
        self._sinks: list[RetrySink] = []
        self._lock = threading.Lock()

    def attach(self, sink: RetrySink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def detach(self, sink: RetrySink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def before_call(self, params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        context[_CONTEXT_KEY] = (model.name, params.get("Key"), _body_size(params.get("Body")))

    def after_call(self, context: dict[str, Any], **_: Any) -> None:
        retries = int(context.get("retries", {}).get("attempt", 1)) - 1
        if retries <= 0:
            return
        operation, key, size = context.get(_CONTEXT_KEY, ("", None, None))
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink(operation, key, retries, size)


def _body_size(body: object) -> int | None:
    if isinstance(body, bytes | bytearray | memoryview):
        return len(body)
    if isinstance(body, io.BytesIO):
        return body.getbuffer().nbytes
    size = getattr(body, "__len__", None)
    return int(size()) if callable(size) else None


def observe_retries(client: Any) -> RetryObserver:
    """The :class:`RetryObserver` of ``client``, registered on its events the first time."""
    observer = getattr(client.meta, "daedalus_retry_observer", None)
    if observer is None:
        observer = RetryObserver()
        events = client.meta.events
        events.register("provide-client-params.s3", observer.before_call)  # the caller's own params
        events.register("after-call.s3", observer.after_call)
        events.register("after-call-error.s3", observer.after_call)
        client.meta.daedalus_retry_observer = observer
    return observer


def scrub(text: str, sync: SyncConfig) -> str:
    """``text`` with the secret key and the key id of ``sync`` replaced by ``***``."""
    for secret in (sync.secret_access_key.get_secret_value(), sync.access_key_id.get_secret_value()):
        if secret:
            text = text.replace(secret, "***")
    return text
