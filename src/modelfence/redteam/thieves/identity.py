"""Who a thief is on the wire: its accounts, each on its own /24 with its own client
library and header order, and the seeded randomness of everything it plans.

Linking joins keys that share a fingerprint (address prefix, user agent, header order)
or a /24, so a thief that wants its accounts judged one by one gives each a fresh one of
all three, for its first accounts and for every rotation alike.

    identities = Identities("hydra-100/chat", slots=100, capacity=100, subnet_base=45_000)
    first = identities.initial()          # 100 profiles, 100 /24s
"""

from __future__ import annotations

import hashlib
import ipaddress

import numpy as np

from modelfence.redteam.traffic import CLIENT_LIBRARIES, ClientProfile

# The header orders of four headers and a library's extras: 5! = 120 and more, so the
# first accounts of a campaign all differ; the offset keeps campaigns apart too.
_HEADER_ORDERS = 119


def generator(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A generator from the run's seed, the thief's name and what the randomness is for:
    two thieves (or two purposes of one) never share a stream."""
    digest = hashlib.blake2b(f"{name}\0{purpose}".encode(), digest_size=16).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])


def address(subnet: int, host: int) -> str:
    """Host ``host`` of the ``subnet``-th /24 after ``10.0.0.0``: what ``make_profile``
    gives below 65,536, and beyond it the count runs on into ``11.0.0.0/8``, so a botnet
    of tens of thousands of proxies still has a /24 each."""
    if not 0 <= subnet < (245 << 16) or not 0 < host < 255:
        raise ValueError(f"no address for subnet {subnet}, host {host}")
    return str(ipaddress.IPv4Address((10 << 24) + (subnet << 8) + host))


class Identities:
    """Every identity one campaign may use: ``slots`` first accounts, then fresh ones for
    key rotation, ``capacity`` in all, identity ``k`` on /24 number ``subnet_base + k``.

    Identity ``k = slot + slots * burnt``: the ``burnt``-th replacement of account ``slot``.
    """

    def __init__(self, campaign: str, *, slots: int, capacity: int, subnet_base: int, seed: int = 0) -> None:
        if not 1 <= slots <= capacity:
            raise ValueError(f"{campaign}: need 1 <= slots <= capacity, got {slots} and {capacity}")
        self.campaign = campaign
        self.slots = slots
        self.capacity = capacity
        self.subnet_base = subnet_base
        offsets = generator(seed, campaign, "identities").integers(1 << 16, size=3)
        self._library, self._order, self._host = (int(o) for o in offsets)

    def slot_name(self, slot: int) -> str:
        return f"{self.campaign}/{slot}"

    def initial(self) -> list[ClientProfile]:
        return [self._profile(slot, 0) for slot in range(self.slots)]

    def fresh(self, slot_name: str, burnt: int) -> ClientProfile:
        """The ``burnt``-th replacement of the account named ``slot_name`` (``burnt >= 1``)."""
        prefix, _, number = slot_name.rpartition("/")
        if prefix != self.campaign or not number.isdigit() or int(number) >= self.slots or burnt < 1:
            raise ValueError(f"{self.campaign}: no account {slot_name!r} to replace (burnt={burnt})")
        return self._profile(int(number), burnt)

    def _profile(self, slot: int, burnt: int) -> ClientProfile:
        k = slot + self.slots * burnt
        if k >= self.capacity:
            raise ValueError(f"{self.campaign}: all {self.capacity} accounts of its budget are spent")
        agent, extra = CLIENT_LIBRARIES[(self._library + k) % len(CLIENT_LIBRARIES)]
        name = self.slot_name(slot) + (f"~{burnt}" if burnt else "")
        return ClientProfile(
            name, "attacker", agent, address(self.subnet_base + k, 1 + (self._host + 89 * k) % 254),
            extra, campaign=self.campaign, header_order=1 + (self._order + k) % _HEADER_ORDERS,
        )
