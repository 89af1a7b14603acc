"""Which suspect URLs the admin API and the console may query for ``verify model``.

The admin API runs inside the gateway, so a suspect URL it fetched on request could reach
anything the gateway can (metadata services, internal admin ports). It queries only URLs
the config lists under ``forensics.allowed_suspect_urls``; ``modelfence verify model
--url`` is run by the operator on their own machine and is not restricted. Entries::

    allowed_suspect_urls:
      - https://suspect.example.com/v1   # this scheme, host and port, paths under /v1
      - http://10.0.0.7:8000             # this scheme, host and port, any path
      - 127.0.0.1                        # a bare host: any port, http or https

Hosts are compared as written (no DNS lookup): list the names the operator will type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from modelfence.forensics.errors import SuspectNotAllowed, VerifyError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"^[a-z0-9._:-]+$")  # a name, an IPv4 or an (unbracketed) IPv6 address


@dataclass(frozen=True, slots=True)
class _Base:
    scheme: str | None  # None: a bare host entry, any scheme and port
    host: str
    port: int | None
    path: str  # without the trailing slash; "" for the root

    def covers(self, url: _Base) -> bool:
        if self.host != url.host:
            return False
        if self.scheme is None:
            return True
        return (self.scheme, self.port) == (url.scheme, url.port) and (
            url.path == self.path or url.path.startswith(self.path + "/")
        )


def parse_url(url: str) -> _Base:
    """An absolute http(s) URL without credentials, query or fragment; VerifyError if not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise VerifyError(f"{url!r} is not a URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise VerifyError(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise VerifyError(f"{url!r} carries credentials: pass a key as api_key instead")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise VerifyError(f"{url!r} has a query or fragment: give the API's base URL")
    segments = unquote(parts.path).split("/")
    if any(segment in (".", "..") for segment in segments):
        raise VerifyError(f"{url!r} has '.' or '..' path segments")
    path = parts.path.rstrip("/")
    return _Base(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], path)


def parse_entry(entry: str) -> _Base:
    """An allow-list entry: a base URL, or a bare host; ValueError naming what is wrong."""
    if "://" in entry:
        try:
            return parse_url(entry)
        except VerifyError as exc:
            raise ValueError(str(exc)) from exc
    host = entry.strip("[]").lower()
    if not host or not _HOST.match(host):
        raise ValueError(
            f"{entry!r} is neither a base URL (https://host[:port][/path]) nor a host name"
        )
    return _Base(None, host, None, "")


class SuspectAllowList:
    """``check(url)`` raises unless some entry covers ``url``; no entries refuse every URL."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(parse_entry(entry) for entry in entries)

    def check(self, url: str) -> None:
        parsed = parse_url(url)
        if not any(entry.covers(parsed) for entry in self.entries):
            where = f"{parsed.scheme}://{parsed.host}:{parsed.port}"
            raise SuspectNotAllowed(
                f"the gateway (admin API, console) queries only suspects listed in the config "
                f"under `forensics.allowed_suspect_urls`, and {where}{parsed.path} is not there: "
                f"add its base URL or host, or run `modelfence verify model --url {url}` "
                "on a machine that can reach it"
            )
