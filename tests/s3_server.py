"""moto's standalone S3 server on 127.0.0.1 as a child process: a real HTTP S3 API."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

KEY_ID = "AKIDTESTSYNC0000"
SECRET = "sEcReT-test-key-do-not-leak-42"
REGION = "us-east-1"
BUCKET = "daedalus-test"
START_DEADLINE = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    port: int
    bucket: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        )  # fmt: skip


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    out = log.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    out.close()
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return process, endpoint, port
        except OSError:
            if time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"moto server did not answer within {START_DEADLINE}s") from None
            time.sleep(0.1)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A fresh moto server with bucket :data:`BUCKET`, stopped after the test."""
    process, endpoint, port = start_server(tmp_path / "moto.log")
    try:
        server = S3Server(endpoint, port, BUCKET, process, tmp_path / "moto.log")
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        stop_server(process)


@pytest.fixture
def s3_auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Server, str, str]]:
    """A moto server that checks signatures: ``(server, key_id, secret)`` of an IAM user allowed
    ``s3:*`` (moto verifies credentials only after its first few unauthenticated actions)."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")
    process, endpoint, port = start_server(tmp_path / "moto.log")
    try:
        server = S3Server(endpoint, port, BUCKET, process, tmp_path / "moto.log")
        server.client().create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                           aws_secret_access_key=SECRET)  # fmt: skip
        iam.create_user(UserName="sync")
        policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
        iam.put_user_policy(UserName="sync", PolicyName="s3", PolicyDocument=policy)
        key = iam.create_access_key(UserName="sync")["AccessKey"]
        yield server, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        stop_server(process)
