"""Cross-client linking: weighted evidence that keys are one actor, which fades, and can be cut.

A botnet spreads an extraction over many keys, each under its limits and each looking
benign; pooled, their queries show the pattern (coverage, sweeps, timing). Evidence that
two keys are one actor, by kind and weight:

| kind | weight | fades | source |
|---|---:|---|---|
| ``account`` | 1.0 | no | the keys belong to one account |
| ``payment``, ``organisation`` | 1.0 | no | their accounts share a payment instrument or a verified organisation (hashed, from the store) |
| ``fingerprint`` | 0.8 | yes | one client fingerprint (address prefix, user agent, header order) |
| ``lockstep`` | 0.8 | yes | busy in the same moments on the same kind of queries (``coactivity.py``) |
| ``ip_prefix`` | 0.6 | yes | one network prefix |
| ``frame`` | 0.6 | yes | accounts on probation sending one prompt frame (system messages and the user turn's opening words) that fewer than ``FRAME_COMMON`` other clients use |
| ``signup_network`` | 0.4 | no | their accounts signed up from one network |
| ``email_domain`` | 0.3 | no | their accounts share an e-mail domain |

Fading evidence halves every ``half_life`` seconds after it was last seen; facts about the
accounts do not fade. Keys are joined into one entity only by a link of at least ``JOIN``
(0.5): a sign-up network or an e-mail domain alone, or a network shared a day ago, never
joins two keys; they are shown to operators with each link's kinds and weight. A pair an
operator cut (``cuts``) is never put in one entity, whatever else links them. Entities are
joined as evidence arrives and rebuilt from the evidence kept (:meth:`Linker.rebuild`),
which is where faded links come apart and new cuts apply. An entity's id is stable for a
given set of members (its smallest member's hash).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from modelfence.telemetry.events import RequestEvent

WEIGHTS: dict[str, float] = {
    "account": 1.0,
    "payment": 1.0,
    "organisation": 1.0,
    "fingerprint": 0.8,
    "lockstep": 0.8,
    "ip_prefix": 0.6,
    "frame": 0.6,
    "signup_network": 0.4,
    "email_domain": 0.3,
}
FADING = frozenset({"fingerprint", "lockstep", "ip_prefix", "frame"})
# A frame used by this many clients that are not on probation is a common one (a popular
# system prompt, "What is the ..."): sharing it says nothing about who the senders are.
FRAME_COMMON = 3
TRAIT_KINDS = ("payment", "organisation", "signup_network", "email_domain")
JOIN = 0.5
MAX_SHOWN = 20  # links listed per client for operators
_CROWD = 1_000  # a hub this large (a public e-mail domain, a big NAT) is not listed pairwise


@dataclass(frozen=True, slots=True)
class Link:
    """Evidence that ``client`` and ``other`` are one actor, as operators see it."""

    other: str
    kinds: tuple[str, ...]
    weight: float  # noisy-or of the kinds' current weights (what the evidence adds up to)
    joins: bool = False  # one kind alone is strong enough to join them (unless cut)
    cut: bool = False


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class _Components:
    """Union-find that refuses a merge putting a cut pair into one component.

    A component's root is always its smallest member (a merge keeps the smaller root), so
    the entity id is a function of the root; its sorted member list is kept until the
    component next changes, since every verdict of every member reads it.
    """

    def __init__(self, cuts: Mapping[str, set[str]]) -> None:
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}
        self._barred: dict[str, set[str]] = {}  # root -> clients its members were cut from
        self._sorted: dict[str, tuple[str, ...]] = {}  # root -> its members, sorted
        self._cuts = cuts

    def find(self, client: str) -> str:
        if client not in self._parent:
            self._parent[client] = client
            self._members[client] = {client}
            self._barred[client] = set(self._cuts.get(client, ()))
        root = client
        while root != self._parent[root]:
            root = self._parent[root]
        while self._parent[client] != root:  # path compression
            self._parent[client], client = root, self._parent[client]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or self._barred[ra] & self._members[rb]:
            return
        root, child = min(ra, rb), max(ra, rb)
        self._parent[child] = root
        self._members[root] |= self._members.pop(child)
        self._barred[root] |= self._barred.pop(child)
        self._sorted.pop(root, None)
        self._sorted.pop(child, None)

    def members(self, client: str) -> tuple[str, ...]:
        """The members of ``client``'s component, sorted (the root, the smallest, first)."""
        root = self.find(client)
        found = self._sorted.get(root)
        if found is None:
            found = self._sorted[root] = tuple(sorted(self._members[root]))
        return found


class Linker:
    """The evidence kept, and the entities it makes (see the module docstring)."""

    def __init__(self, *, half_life: float = 24 * 3600.0) -> None:
        self.half_life = half_life
        self._hubs: dict[str, dict[str, float]] = {}  # "kind:value" -> client -> last seen
        self._hubs_of: dict[str, set[str]] = {}  # client -> its hubs (the index of the above)
        self._pairs: dict[tuple[str, str], float] = {}  # lockstep pair -> last seen
        self._partners: dict[str, set[str]] = {}  # client -> its lockstep partners (the index)
        self._accounts: dict[str, set[str]] = {}  # account -> its clients
        self._traits: dict[str, dict[str, str]] = {}  # account -> trait kind -> keyed hash
        self._cuts: dict[str, set[str]] = {}
        self._probation: set[str] = set()  # clients whose account was on probation when last seen
        self._frame_users: dict[str, set[str]] = {}  # frame hub -> its users off probation (capped)
        self._now = 0.0
        self._components = _Components(self._cuts)

    # -- evidence --------------------------------------------------------------

    def observe(self, event: RequestEvent) -> None:
        """Record what this request says about its client, and join what it links now."""
        client, ts = event.client, event.ts
        self._now = max(self._now, ts)
        self._components.find(client)
        # A request refused before admission carries no trust level: it changes nothing.
        if event.trust == "probation":
            self._probation.add(client)
        elif event.trust:
            self._probation.discard(client)
        hubs = [
            ("fingerprint", event.fingerprint),
            ("ip_prefix", event.ip_prefix),
            ("frame", event.frame_hash),
        ]
        if event.account:
            self._accounts.setdefault(event.account, set()).add(client)
            hubs.append(("account", event.account))
            hubs += list(self._traits.get(event.account, {}).items())
        counts = bool(event.trust) and event.trust != "probation" and event.status < 400
        for kind, value in hubs:
            if value:
                self._touch(kind, value, client, ts, trusted_answer=counts)

    def link(self, a: str, b: str, ts: float) -> None:
        """Behavioural evidence that ``a`` and ``b`` act as one (``coactivity.py``)."""
        self._pairs[_pair(a, b)] = max(ts, self._pairs.get(_pair(a, b), ts))
        self._partners.setdefault(a, set()).add(b)
        self._partners.setdefault(b, set()).add(a)
        self._now = max(self._now, ts)
        if a not in self._cuts.get(b, ()):
            self._components.union(a, b)

    def set_traits(self, account: str, traits: Mapping[str, str]) -> None:
        """The account's hashed metadata (from the store); applies to its keys from now."""
        kept = {kind: value for kind, value in traits.items() if kind in TRAIT_KINDS}
        old = self._traits.get(account, {})
        for kind, value in old.items():
            if kept.get(kind) != value:
                key = f"{kind}:{value}"
                hub = self._hubs.get(key, {})
                for client in self._accounts.get(account, ()):
                    hub.pop(client, None)
                    self._hubs_of.get(client, set()).discard(key)
        self._traits[account] = kept
        for client in self._accounts.get(account, ()):
            for kind, value in kept.items():
                self._touch(kind, value, client, self._now)

    def set_cuts(self, pairs: Iterable[tuple[str, str]]) -> bool:
        """Replace the operator's cuts; True when they changed (then :meth:`rebuild`)."""
        cuts: dict[str, set[str]] = {}
        for a, b in pairs:
            cuts.setdefault(a, set()).add(b)
            cuts.setdefault(b, set()).add(a)
        if cuts == self._cuts:
            return False
        self._cuts.clear()
        self._cuts.update(cuts)
        return True

    def _touch(
        self, kind: str, value: str, client: str, ts: float, *, trusted_answer: bool = False
    ) -> None:
        # Members are kept in the order last seen: the latest other one is the freshest link.
        key = f"{kind}:{value}"
        hub = self._hubs.setdefault(key, {})
        self._hubs_of.setdefault(client, set()).add(key)
        seen = max(ts, hub.pop(client, ts))
        latest = next(reversed(hub), None)
        hub[client] = seen
        if kind == "frame":
            latest = self._frame_partner(key, hub, client, counts=trusted_answer)
        if latest is not None and self.weight(kind, min(hub[latest], seen), ts) >= JOIN:
            self._components.union(latest, client)

    def _frame_partner(
        self, key: str, hub: dict[str, float], client: str, *, counts: bool
    ) -> str | None:
        """The latest other user on probation of a frame still uncommon, if ``client`` is on
        probation too (see ``FRAME_COMMON``). Only answered requests of clients past
        probation (``counts``) make a frame common: refused ones prove nothing."""
        if client not in self._probation:
            users = self._frame_users.setdefault(key, set())
            if counts and len(users) < FRAME_COMMON:
                users.add(client)
            return None
        if len(self._frame_users.get(key, ())) >= FRAME_COMMON:
            return None
        return next((c for c in reversed(hub) if c != client and c in self._probation), None)

    def _evidence(self, key: str, kind: str, members: dict[str, float]) -> dict[str, float]:
        """The members of one hub whose sharing it is evidence: all of them, except for a
        frame, where only users on probation of a frame still uncommon count."""
        if kind != "frame":
            return members
        if len(self._frame_users.get(key, ())) >= FRAME_COMMON:
            return {}
        return {c: t for c, t in members.items() if c in self._probation}

    def _joined(self, key: str, kind: str, live: dict[str, float], since: float) -> list[str]:
        """The members of one hub a rebuild joins: those last seen at ``since`` or later
        (see :meth:`_since`)."""
        evidence = self._evidence(key, kind, live)
        return [c for c, t in evidence.items() if t >= since]

    # -- entities --------------------------------------------------------------

    def weight(self, kind: str, last_seen: float, now: float) -> float:
        if kind not in FADING:
            return WEIGHTS[kind]
        fade: float = 0.5 ** (max(now - last_seen, 0.0) / self.half_life)
        return WEIGHTS[kind] * fade

    def _since(self, kind: str, weight: float, now: float) -> float:
        """The oldest last-seen time at which ``kind``'s evidence still weighs ``weight`` at
        ``now`` (-inf when it never fades, +inf when it never weighs that much): a rebuild
        compares every member's time with it instead of computing every member's weight."""
        if WEIGHTS[kind] < weight:
            return math.inf
        if kind not in FADING:
            return -math.inf
        return now - self.half_life * math.log2(WEIGHTS[kind] / weight)

    def rebuild(self, now: float) -> None:
        """Entities anew from the evidence kept at ``now``: faded links drop, cuts apply.

        Evidence faded below any use (under a tenth of its weight) is forgotten, so memory
        follows the links that still matter.
        """
        self._now = max(self._now, now)
        components = _Components(self._cuts)
        kept = {kind: self._since(kind, 0.1 * weight, now) for kind, weight in WEIGHTS.items()}
        joins = {kind: self._since(kind, JOIN, now) for kind in WEIGHTS}
        for key, members in list(self._hubs.items()):
            kind = key.partition(":")[0]
            live = {c: t for c, t in members.items() if t >= kept[kind]}
            if not live:  # faded, or emptied by set_traits
                for client in members:
                    self._hubs_of[client].discard(key)
                del self._hubs[key]
                self._frame_users.pop(key, None)
                continue
            if len(live) < len(members):
                for client in members.keys() - live.keys():
                    self._hubs_of[client].discard(key)
                self._hubs[key] = live
            if len(live) < 2 or joins[kind] == math.inf:  # nothing here to join
                continue
            joined = self._joined(key, kind, live, joins[kind])
            for client in joined:
                components.union(joined[0], client)
        for pair, last in list(self._pairs.items()):
            if last < kept["lockstep"]:
                del self._pairs[pair]
                for one, other in (pair, pair[::-1]):
                    partners = self._partners[one]
                    partners.discard(other)
                    if not partners:
                        del self._partners[one]
            elif last >= joins["lockstep"]:
                components.union(*pair)
        # Clients without a link are not carried over: find() makes anyone's singleton
        # when asked, so the components hold the linked clients, not everyone ever seen.
        self._components = components

    def on_probation(self, client: str) -> bool:
        """Whether the client's account was on probation when it was last seen."""
        return client in self._probation

    def members(self, client: str) -> tuple[str, ...]:
        return self._components.members(client)

    def entity_of(self, client: str) -> str:
        root = self._components.find(client)
        return "ent_" + hashlib.sha256(root.encode()).hexdigest()[:12]

    def links_of(self, client: str, now: float) -> list[Link]:
        """The strongest links of ``client`` (at most ``MAX_SHOWN``), with their kinds."""
        kinds: dict[str, dict[str, float]] = {}
        for key in self._hubs_of.get(client, ()):
            seen = self._hubs[key]
            kind = key.partition(":")[0]
            if kind == "frame" and client not in self._probation:
                continue  # a frame is evidence only between users on probation
            evidence = self._evidence(key, kind, seen)
            if len(evidence) > _CROWD or client not in evidence:
                continue
            for other, t in evidence.items():
                if other != client:
                    mine = self.weight(kind, min(t, seen[client]), now)
                    found = kinds.setdefault(other, {})
                    found[kind] = max(found.get(kind, 0.0), mine)
        for other in self._partners.get(client, ()):
            last = self._pairs[_pair(client, other)]
            kinds.setdefault(other, {})["lockstep"] = self.weight("lockstep", last, now)
        cut = self._cuts.get(client, set())
        links = []
        for other, weights in kinds.items():
            miss = 1.0
            for value in weights.values():
                miss *= 1.0 - value
            joins = any(value >= JOIN for value in weights.values())
            links.append(
                Link(other, tuple(sorted(weights)), round(1.0 - miss, 3), joins, other in cut)
            )
        links.sort(key=lambda link: (-link.weight, link.other))
        return links[:MAX_SHOWN]
