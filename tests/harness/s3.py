"""A real S3 endpoint standing in for OSS: moto's server on 127.0.0.1, in its own process.

Moto keeps objects in memory and reads a whole object to answer a ranged GET: right for
correctness, not for throughput (benchmarks use a server that serves ranges from disk).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

from tests.harness.parts import free_port, port_open, wait_until

ACCESS_KEY = "berth-test-access-key"
SECRET_KEY = "berth-test-secret-key-never-print"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """The environment a service (or berth boot) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "OSS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def new_bucket(self, prefix: str = "berth-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, bucket: str, prefix: str, root: Path) -> list[str]:
        """Upload every file under `root` to s3://bucket/prefix/...; returns the keys."""
        keys = []
        s3 = self.client()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}".lstrip("/")
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


def start_moto(log_path: Path) -> S3Server:
    port = free_port()
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=log, start_new_session=True,
    )
    wait_until(lambda: port_open("127.0.0.1", port) or process.poll() is not None, 30, "moto server start")
    if process.poll() is not None:
        raise RuntimeError(f"moto server exited with {process.returncode}; see {log_path}")
    return S3Server(endpoint=f"http://127.0.0.1:{port}", _process=process)


def stop_moto(server: S3Server) -> None:
    if server._process is not None:
        server._process.terminate()
        server._process.wait(timeout=10)
