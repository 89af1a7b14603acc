"""The gateway's copy of the published actions: read on every request, never computed there.

:class:`ActionCache` holds the non-normal actions in a dict, refreshed in the background
every ``state_poll_seconds`` from the shared state (SQL or Redis) by a
:class:`~modelfence.periodic.Periodic` loop, so a request costs one dict lookup. It is
the gateway's ``ActionSource`` (:class:`~modelfence.gateway.detection.Enforce`) and the
policy layer's ``RiskSource`` for output hardening. If the state cannot be read, the last
snapshot stays in force; the failure is counted through ``on_error`` and logged, and the
loop backs off and keeps trying.
"""

from __future__ import annotations

from modelfence.detect.actions import NORMAL, Action
from modelfence.detect.state import StateReader
from modelfence.periodic import OnError, Periodic
from modelfence.policy.risk import RiskLevel, level_for_action

TASK_NAME = "detection-state"


class ActionCache:
    def __init__(
        self, reader: StateReader, *, poll_seconds: float, on_error: OnError | None = None
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be > 0")
        self.reader = reader
        self._actions: dict[str, Action] = {}
        self.poller = Periodic(TASK_NAME, self.refresh, interval=poll_seconds, on_error=on_error)

    @property
    def failures(self) -> int:
        """Failed reads of the state so far."""
        return self.poller.errors

    def get(self, client: str) -> Action:
        return self._actions.get(client, NORMAL)

    def level_for(self, client: str) -> RiskLevel:
        """The output-hardening level (the policy layer's ``RiskSource``)."""
        return level_for_action(self.get(client).level)

    async def refresh(self) -> None:
        """Replace the snapshot; raises what the reader raises (the old one stays)."""
        self._actions = await self.reader.actions()

    async def start(self) -> None:
        """Read once (a failure is counted, not raised), then poll in the background."""
        ok = await self.poller.once()
        self.poller.start(first_delay=None if ok else self.poller.backoff())

    async def stop(self) -> None:
        await self.poller.stop()
