"""The key broker seen from the model server: the gateway's broker routes over HTTP.

:class:`RemoteBroker` has the two calls of :class:`~modelfence.confidential.broker.KeyBroker`
that a worker's provisioning needs, so ``launcher.provision(client, broker, sealed)`` runs
the same exchange against a broker in this process or in the gateway::

    broker = RemoteBroker("https://gateway:8443", broker_token)   # confidential.token
    with WorkerClient(worker.socket_path) as client:
        provision(client, broker, Path("head.sealed"))

A refusal is :class:`ReleaseRefused` with the broker's reason. A broker that cannot be
connected to is retried until ``wait_seconds`` have passed (a model server may start
first); a request that may have reached it is not (a release consumes its nonce), and is
:class:`BrokerUnavailable`: provision again from a new challenge. The token travels only
over HTTPS, or plain HTTP to a loopback address.
"""

from __future__ import annotations

import base64
import ipaddress
import time
from typing import Any, Self

import httpx

from modelfence.confidential.attestation import Evidence
from modelfence.confidential.broker import ReleasedKey, ReleaseRefused
from modelfence.confidential.sealing import SealedHeader
from modelfence.errors import ModelFenceError

PREFIX = "/confidential/v1"


class BrokerUnavailable(ModelFenceError):
    """The broker did not answer, or answered something that is not a decision."""


class RemoteBroker:
    def __init__(self, url: str, token: str, *, timeout: float = 10.0,
                 wait_seconds: float = 0.0) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme != "https" and not (parsed.scheme == "http" and _loopback(parsed.host)):
            raise ModelFenceError(f"broker URL {url!r}: use https:// (plain http only to a "
                                  "loopback address): the broker token must not cross in the clear")
        self._client = httpx.Client(base_url=url.rstrip("/") + PREFIX, timeout=timeout,
                                    headers={"authorization": f"Bearer {token}"})
        self.wait_seconds = wait_seconds
        self.security_level = "unknown"  # what the broker says it is worth, once it answered

    def challenge(self) -> bytes:
        body = self._post("/challenge", None)
        self.security_level = str(body.get("security_level", "unknown"))
        return _hex(body, "nonce", 32)

    def release(self, header: SealedHeader, evidence: Evidence, worker_public_key: bytes,
                nonce: bytes) -> ReleasedKey:
        body = self._post("/release", {
            "header": base64.b64encode(header.raw).decode(),
            "evidence": evidence.to_dict(),
            "public_key": worker_public_key.hex(),
            "nonce": nonce.hex(),
        })
        return ReleasedKey(_hex(body, "ephemeral_public_key", 32), _hex(body, "nonce", 12),
                           _hex(body, "ciphertext", 48), str(body.get("security_level", "")))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _post(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                response = self._client.post(path, json=payload)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f"key broker unreachable: {exc}") from exc
                time.sleep(0.5)
            except httpx.TransportError as exc:  # it may have been received: never resent
                raise BrokerUnavailable(f"key broker request {path} failed: {exc!r}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BrokerUnavailable(f"key broker answered {response.status_code} without JSON")
        if response.status_code == 403:
            raise ReleaseRefused(str(body.get("error", {}).get("message", "refused")))
        if response.status_code != 200:
            raise BrokerUnavailable(f"key broker answered {response.status_code}: "
                                    f"{body.get('error', {}).get('message', body)}")
        return body


def _hex(body: dict[str, Any], field: str, size: int) -> bytes:
    try:
        value = bytes.fromhex(str(body[field]))
    except (KeyError, ValueError) as exc:
        raise BrokerUnavailable(f"key broker answer lacks {field}") from exc
    if len(value) != size:
        raise BrokerUnavailable(f"key broker answer: {field} is not {size} bytes")
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
