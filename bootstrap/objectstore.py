"""Where an `oss://` or `s3://` prefix lives and how to sign for it; listing it.

OSS speaks the S3 protocol, so one client serves both. The endpoint comes from the spec or,
when the spec has none (the usual EAS config), from the environment the agent gives every
container: `OSS_ENDPOINT` for oss://, `AWS_ENDPOINT_URL` for s3://. Keys come only from the
environment and are held as SecretStr, so no repr, log line or error can show them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

from pydantic import SecretStr

from bootstrap.spec import ObjectStore

DEFAULT_REGION = "us-east-1"
# botocore's debug log prints signed request headers, access key id included: never below INFO.
for _name in ("botocore", "aiobotocore", "s3fs"):
    logging.getLogger(_name).setLevel(logging.INFO)
RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}


class ObjectStoreError(Exception):
    """The store cannot be reached or used; the message names the store, never a key."""


@dataclass(frozen=True)
class Location:
    """One resolved prefix: endpoint, bucket and prefix, plus the keys to sign with."""

    url: str  # oss://bucket/prefix/ as the spec wrote it: what messages name
    endpoint: str
    bucket: str
    prefix: str
    access_key: SecretStr | None
    secret_key: SecretStr | None
    region: str
    addressing_style: str

    @property
    def anonymous(self) -> bool:
        return self.access_key is None


@dataclass(frozen=True)
class RemoteObject:
    key: str
    size: int
    etag: str  # as the server sends it, quotes included: If-Match wants it verbatim

    def relative_to(self, prefix: str) -> str:
        return self.key[len(prefix):].lstrip("/")


def resolve(store: ObjectStore, env: Mapping[str, str]) -> Location:
    """The endpoint and keys for a spec entry, from the spec first and the environment next."""
    scheme = store.scheme
    if scheme == "oss":
        endpoint = store.endpoint or env.get("OSS_ENDPOINT") or env.get("AWS_ENDPOINT_URL")
        names = ("OSS_ENDPOINT",)
    else:
        endpoint = env.get("AWS_ENDPOINT_URL") or store.endpoint or env.get("AWS_ENDPOINT_URL_S3")
        names = ("AWS_ENDPOINT_URL",)
    if not endpoint:
        raise ObjectStoreError(
            f"{store.path}: no endpoint; give {scheme}.endpoint in the spec or set {names[0]} in the environment"
        )
    if "://" not in endpoint:
        endpoint = "https://" + endpoint  # OSS endpoints are usually written bare
    access, secret = _keys(env)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or env.get("OSS_REGION") or DEFAULT_REGION
    style = env.get("BERTH_S3_ADDRESSING_STYLE") or _addressing_style(scheme, endpoint)
    prefix = store.prefix
    return Location(store.path, endpoint.rstrip("/"), store.bucket, prefix, access, secret, region, style)


def _keys(env: Mapping[str, str]) -> tuple[SecretStr | None, SecretStr | None]:
    for access_name, secret_name in (
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"),
    ):
        if env.get(access_name) and env.get(secret_name):
            return SecretStr(env[access_name]), SecretStr(env[secret_name])
    return None, None


def _addressing_style(scheme: str, endpoint: str) -> str:
    # Aliyun OSS accepts only virtual-hosted requests (bucket.endpoint); a server on an IP
    # address or localhost (a test server, MinIO) can only do path style.
    host = urlsplit(endpoint).hostname or ""
    if scheme != "oss" or host == "localhost" or _is_ip(host):
        return "path"
    return "virtual"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@asynccontextmanager
async def client(location: Location, *, max_connections: int = 16, read_timeout: float = 60.0) -> AsyncIterator[object]:
    """An aiobotocore S3 client with a connection pool sized for the parallel download.

    botocore's own retries are off: download.py retries each part itself, so a retry
    resumes from the bytes already written instead of starting the part again.
    """
    from aiobotocore.config import AioConfig

    config = AioConfig(
        max_pool_connections=max_connections,
        connect_timeout=10,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": location.addressing_style},
        signature_version="s3v4" if not location.anonymous else _unsigned(),
        # Checksum trailers on every request are an AWS novelty that OSS and older S3
        # servers reject; a download has no body to check anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = _session()
    keys = {}
    if not location.anonymous:
        keys = {
            "aws_access_key_id": location.access_key.get_secret_value(),
            "aws_secret_access_key": location.secret_key.get_secret_value(),
        }
    async with session.create_client(
        "s3", endpoint_url=location.endpoint, region_name=location.region, config=config, **keys
    ) as s3:
        yield s3


@lru_cache(maxsize=1)
def _session():
    """One botocore session per process: loading its S3 model costs about 0.2 s."""
    from aiobotocore.session import get_session

    return get_session()


def _unsigned():
    from botocore import UNSIGNED

    return UNSIGNED


async def list_objects(s3, location: Location, *, attempts: int = 6,
                       backoff: Callable[[int], float] = lambda attempt: 0.25 * 2 ** attempt) -> list[RemoteObject]:
    """Every object under the prefix (directory markers left out), or a clear error."""
    for attempt in range(1, attempts + 1):
        try:
            found = await _list_once(s3, location)
            break
        except Exception as exc:  # noqa: BLE001 - S3 errors and connection failures of every kind
            retry, hint, reason = classify(exc)
            if not retry:
                raise ObjectStoreError(describe_client_error(exc, location, "list")) from None
            if attempt == attempts:
                raise ObjectStoreError(f"{location.url}: list failed after {attempts} tries: {reason} from {location.endpoint}") from None
            await asyncio.sleep(max(hint or 0.0, backoff(attempt)))
    prefix = location.prefix
    if prefix and not prefix.endswith("/"):
        # "oss://b/model" names a directory: keep model/..., not model-v2/...
        found = [o for o in found if o.key == prefix or o.key.startswith(prefix + "/")]
    return found


async def _list_once(s3, location: Location) -> list[RemoteObject]:
    found = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/") and item["Size"] == 0:
                continue  # a "folder" placeholder some consoles create
            found.append(RemoteObject(item["Key"], item["Size"], item["ETag"]))
    return found


def classify(exc: BaseException) -> tuple[bool, float | None, str]:
    """Whether to retry, the delay the server asked for (OSS QoS, Retry-After), and a short reason.

    5xx, 429, SlowDown and the like are retried; so is every failure below HTTP (refused,
    reset, timed out, cut mid-body). Other S3 errors (403, 404, 412) are not.
    """
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return True, None, type(exc).__name__
    status, code, hint = error_facts(exc)
    retry = status >= 500 or status == 429 or code in RETRYABLE_CODES
    return retry, hint, f"{code or 'HTTP'} {status}"


def error_facts(exc) -> tuple[int, str, float | None]:
    """HTTP status, S3 error code and the server's requested delay in seconds."""
    response = exc.response
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = response.get("Error", {}).get("Code", "")
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    hint = None
    if headers.get("x-oss-qos-delay-time", "").isdigit():
        hint = min(int(headers["x-oss-qos-delay-time"]) / 1000, 60.0)  # milliseconds
    elif headers.get("retry-after", "").isdigit():
        hint = min(float(headers["retry-after"]), 60.0)
    return status, code, hint


def describe_client_error(exc, location: Location, action: str) -> str:
    """A message for an S3 error code; the server's own text is left out (it can echo keys)."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    hints = {
        "NoSuchBucket": f"bucket {location.bucket!r} does not exist at {location.endpoint}",
        "InvalidAccessKeyId": "the access key is not known to the server; check AWS_ACCESS_KEY_ID / OSS_ACCESS_KEY_ID",
        "SignatureDoesNotMatch": "the secret key is wrong; check AWS_SECRET_ACCESS_KEY / OSS_ACCESS_KEY_SECRET",
        "AccessDenied": "access denied; the keys lack read permission on this prefix",
        "NoSuchKey": "the object disappeared while it was being read",
    }
    reason = hints.get(code) or f"{code or 'error'} (HTTP {status})"
    return f"{location.url}: {action} failed: {reason}"
