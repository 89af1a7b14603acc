"""Cross-client linking: keys that share a machine or a network form one entity.

(Keys that act in lockstep are joined too, by the engine, from ``coactivity.py``.)

A botnet spreads an extraction over many keys, each under its limits and each looking
benign; pooled, their queries show the pattern (coverage, sweeps, timing). Keys are
joined (union-find) when they share a client fingerprint (address prefix, user agent and
header order) or an IP prefix; the entity's id is stable for a given set of links (its
smallest member's hash), and the engine evaluates an entity's pooled queries like a client's.
"""

from __future__ import annotations

import hashlib

from modelfence.telemetry.events import RequestEvent


class Linker:
    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._owner: dict[str, str] = {}  # "fp:<digest>" / "ip:<prefix>" -> first client seen
        self._groups: dict[str, set[str]] = {}  # root -> members

    def _find(self, client: str) -> str:
        if client not in self._parent:
            self._parent[client] = client
            self._groups[client] = {client}
        root = client
        while root != self._parent[root]:
            root = self._parent[root]
        node = client
        while self._parent[node] != root:  # path compression
            self._parent[node], node = root, self._parent[node]
        return root

    def link(self, a: str, b: str) -> None:
        """Join two clients' entities (behavioural evidence, see ``coactivity.py``)."""
        self._union(a, b)

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            root, child = min(ra, rb), max(ra, rb)
            self._parent[child] = root
            self._groups[root] |= self._groups.pop(child)

    def observe(self, event: RequestEvent) -> None:
        self._find(event.client)
        for link in (f"fp:{event.fingerprint}", f"ip:{event.ip_prefix}"):
            if link.endswith(":"):
                continue
            owner = self._owner.setdefault(link, event.client)
            self._union(owner, event.client)

    def members(self, client: str) -> list[str]:
        return sorted(self._groups[self._find(client)])

    def entity_of(self, client: str) -> str:
        return "ent_" + hashlib.sha256(self._find(client).encode()).hexdigest()[:12]
