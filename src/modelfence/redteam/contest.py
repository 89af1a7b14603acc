"""Replay with feedback: an honest population and a set of thieves through the gateway's
limits and detection, on event time, with every refusal reported back to the thief.

Plain replay (``replay.py``) feeds events to a consumer and nothing answers back; a thief
that rotates its key after a block, or an honest job that meets a 429, needs the
gateway's answer. ``Contest`` plays the gateway's admission decisions in time order:

1. detection's current action for the client (``block`` answers 403; ``tighten`` and
   above scale the limits; ``degrade`` degrades the answer), as ``gateway/detection.py``;
2. when defended, the account's trust (``identity/trust.py``: each client is its own
   account, signed up at ``ClientProfile.signed_up`` or else at its first request, so a
   thief's fresh account starts on probation, as does one detection demoted; one created
   during a sign-up surge, which the watch finds among every account's sign-up, is held)
   and the allowance of that level, charged with the request's inputs, as
   ``gateway/admission.py``;
3. the real in-process limit backend (``limits/memory.py``) with the deployment's tiers,
   prices and the real request parsers' token estimates, on the events' own clock;
4. the events, refused ones included (a live gateway records those too), go to the real
   ``DetectionEngine`` every ``WINDOW`` (2 s) of event time, and its verdicts become the
   actions for the requests after that (a live detector publishes within a second or two).

A thief's retry of a request its account's allowance refused is sent once the allowance
has room for it (the 429's Retry-After, the next UTC day for a daily cap), and never when
the request is larger than the whole allowance: earlier tries could only be refused again,
and a minute apart they would be most of a run's events.

Undefended means limits only (``engine=None``): no detection, no trust levels. Outputs are
not generated: a request's tokens are its reservation (prompt estimate + ``max_tokens``),
which is what the gateway charges before the answer exists. The outcome per honest client
is the set of frictions it met; per thief, what it got: its answered extraction requests in
order, with the accounts it had used by then, and what it spent.

    contest = Contest(config, engine)
    result = contest.run(plans, profiles, thieves)
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import NamedTuple

from modelfence.config import Config
from modelfence.detect.actions import NORMAL, Action, rank
from modelfence.detect.engine import DetectionEngine, Verdict
from modelfence.identity.base import AccountRecord
from modelfence.identity.signups import SignupWatch
from modelfence.identity.trust import Standing, TrustPolicy
from modelfence.limits.base import AdmissionRequest
from modelfence.limits.memory import MemoryBackend
from modelfence.limits.quota import quota_for
from modelfence.redteam.replay import event_for
from modelfence.redteam.replay_attacks import answer_classifier, shows_margins
from modelfence.redteam.tariff import Tariff
from modelfence.redteam.thieves.base import DAY, Thief
from modelfence.redteam.traffic import DIGITS_INFER, ClientProfile, PlannedRequest
from modelfence.telemetry.events import RequestEvent

START_TS = 1_767_225_600.0  # 2026-01-01 00:00 UTC
WINDOW = 2.0  # event seconds between detector batches: a live detector publishes within a second or two
ANSWERED, THROTTLED, BLOCKED = 200, 429, 403
# Frictions an honest client can meet. "refused" is any 429; "probation" and
# "account_budget" a 429 from the account's allowance, on probation or at another level;
# "probation_after_week" one on probation at least ``probation_days`` after signing up
# (only detection's demotion puts such an account there).
FRICTIONS = ("refused", "degraded", "blocked", "tightened", "probation", "probation_after_week",
             "account_budget")
ACCOUNT_DENIALS = ("account_rows", "account_tokens")
EARLY_DAYS = 2.0  # "refused within two days" of a campaign's start (the hydra target)


@dataclass
class CampaignOutcome:
    """What one thief got and spent in one run."""

    name: str
    requests: int = 0
    answered: list[tuple[PlannedRequest, int]] = field(default_factory=list)  # extraction, senders by then
    cover_answered: int = 0
    throttled: int = 0
    blocked: int = 0
    degraded: int = 0
    usd: float = 0.0
    accounts_created: int = 0  # initial accounts plus rotations (what Budget.accounts bounds)
    senders: set[str] = field(default_factory=set)  # identities that sent at least one request
    accounts_flagged: int = 0
    refused_early: set[str] = field(default_factory=set)  # identities refused (429/403) in the campaign's first two days
    units_before_first_flag: int | None = None  # extraction units answered before any account's alert


@dataclass
class ContestResult:
    defended: bool
    campaigns: dict[str, CampaignOutcome]
    honest: dict[str, set[str]]  # client -> frictions met (empty: none)
    honest_flagged: set[str] = field(default_factory=set)  # raised to alert or above at some point
    reasons: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # client -> (worst level, reason codes)
    events: int = 0
    seconds: float = 0.0


@dataclass
class _Slot:
    """One account position of a thief: the identity in use and whether it still sends."""

    thief: Thief
    outcome: CampaignOutcome
    identity: ClientProfile
    siblings: list[_Slot]  # every slot of the same thief (a spent budget stops them all)
    burnt: int = 0
    alive: bool = True


class _Answer(NamedTuple):
    """The gateway's answer to one request, as the bookkeeping needs it."""

    status: int
    degraded: bool = False  # and the client notices (``_felt``)
    usd: float = 0.0  # dollars charged
    # A refusal by the account's allowance: its honest frictions, and when (virtual seconds)
    # the allowance has room for the request (inf: not at the account's present level).
    capped: tuple[str, ...] = ()
    room_at: float = 0.0


def _felt(plan: PlannedRequest) -> bool:
    """Whether degrading changes this request's answer: degrade serves text only and
    labels only, so only a request for logprobs or classifier probabilities notices."""
    if plan.route == DIGITS_INFER:
        return shows_margins(plan.body)
    return bool(plan.body.get("logprobs") or plan.body.get("top_logprobs"))


class Contest:
    """The gateway's decisions for a replayed population (see module docstring)."""

    def __init__(self, config: Config, engine: DetectionEngine | None, *, window: float = WINDOW) -> None:
        self.config = config
        self.engine = engine
        self.window = window
        self.now = START_TS
        self.limits = MemoryBackend(clock=lambda: self.now)
        self.actions: dict[str, Action] = {}
        self.tariff = Tariff(config)
        self._flagged: set[str] = set()
        self._owner: dict[str, _Slot] = {}  # identity in use -> its slot
        self._worst: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._accounts: dict[str, AccountRecord] = {}  # client -> its account, once it sent
        # The store's sign-ups as they happen: every honest customer's (``run(signups=)``),
        # and each thief account's when it is created.
        self.signups = SignupWatch(config.accounts.surge)
        self.trust = TrustPolicy(config.accounts, self, surges=self.signups, clock=lambda: self.now)

    def account(self, account_id: str) -> AccountRecord | None:
        """The account of the client ``account_id`` once it has sent (the trust lookup)."""
        return self._accounts.get(account_id)

    def run(
        self, plans: Sequence[PlannedRequest], profiles: Iterable[ClientProfile], thieves: Sequence[Thief],
        *, signups: Sequence[tuple[str, float]] = (),
    ) -> ContestResult:
        """``signups``: (account, virtual seconds) of every account the store holds besides
        the thieves', in time order, each shown to the surge watch when its time comes; the
        store's history starts at the first of them (or at the start, if none is earlier)."""
        return asyncio.run(self._run(plans, profiles, thieves, signups))

    async def _run(
        self, plans: Sequence[PlannedRequest], profiles: Iterable[ClientProfile], thieves: Sequence[Thief],
        signups: Sequence[tuple[str, float]],
    ) -> ContestResult:
        started = time.perf_counter()
        self.signups.known_since = START_TS + (min(0.0, signups[0][1]) if signups else 0.0)
        next_signup = 0
        honest_profiles = {p.name: p for p in profiles}
        result = ContestResult(self.engine is not None, {t.name: CampaignOutcome(t.name) for t in thieves},
                               {name: set() for name in honest_profiles})
        slots: dict[str, _Slot] = {}  # initial account name -> slot
        queue: list[tuple[float, int, PlannedRequest, str]] = []  # (at, order, plan, slot key)
        order = 0
        for thief in thieves:
            outcome = result.campaigns[thief.name]
            siblings: list[_Slot] = []
            for profile in thief.accounts():
                slots[profile.name] = self._owner[profile.name] = _Slot(thief, outcome, profile, siblings)
                siblings.append(slots[profile.name])
            outcome.accounts_created = len(siblings)
            for plan in thief.plans():
                queue.append((plan.at, order, plan, plan.client))
                order += 1
        heapq.heapify(queue)
        if self.engine is not None:
            self.engine.listener = self._note_flag
        honest = sorted(plans, key=lambda p: p.at)
        next_honest, horizon = 0, 0.0
        while next_honest < len(honest) or queue:
            first = min(honest[next_honest].at if next_honest < len(honest) else float("inf"),
                        queue[0][0] if queue else float("inf"))
            horizon = max(horizon, first) + self.window  # quiet stretches are skipped
            due: list[tuple[float, PlannedRequest, ClientProfile, _Slot | None]] = []
            while next_honest < len(honest) and honest[next_honest].at < horizon:
                plan = honest[next_honest]
                due.append((plan.at, plan, honest_profiles[plan.client], None))
                next_honest += 1
            while queue and queue[0][0] < horizon:
                at, _, plan, key = heapq.heappop(queue)
                due.append((at, plan, slots[key].identity, slots[key]))
            due.sort(key=lambda d: d[0])
            events: list[RequestEvent] = []
            with_margins: list[RequestEvent] = []
            for at, plan, profile, sender in due:
                if sender is not None and not sender.alive:
                    continue  # stopped earlier in this window (blocked, out of accounts or dollars)
                if sender is not None:
                    profile = sender.identity  # rotated earlier in this window
                self.now = START_TS + at
                while self.engine is not None and next_signup < len(signups) and signups[next_signup][1] <= at:
                    account, signed_up = signups[next_signup]
                    self.signups.observe(account, START_TS + signed_up)
                    next_signup += 1
                event = event_for(plan, profile, ts=self.now, request_id=f"contest-{result.events:09d}")
                result.events += 1
                answer = await self._admit(plan, profile, event)
                event.status = answer.status
                events.append(event)
                margins = event.input_rows and shows_margins(plan.body) and not answer.degraded
                if answer.status == ANSWERED and margins:
                    with_margins.append(event)
                if sender is None:
                    self._note_honest(result.honest[profile.name], answer, profile.name)
                else:
                    order = self._note_thief(sender, plan, at, answer, queue, order, horizon)
            if self.engine is not None and events:
                answer_classifier(with_margins)
                for verdict in self.engine.process(events):
                    self.actions[verdict.client] = verdict.action
        result.honest_flagged = self._flagged - set(self._owner)
        result.reasons = self._worst
        result.seconds = time.perf_counter() - started
        return result

    # -- the gateway's decision ---------------------------------------------------------

    async def _admit(
        self, plan: PlannedRequest, profile: ClientProfile, event: RequestEvent
    ) -> _Answer:
        """The gateway's answer to one request."""
        action = self.actions.get(profile.name, NORMAL)
        event.risk_level = action.level
        record = self._record(profile) if self.engine is not None else None
        standing = None if record is None else self.trust.assess(record, action.level, self.now)
        if record is not None and standing is not None:  # as the gateway's event says it
            event.account, event.trust = record.account_id, standing.level
        if action.blocks:
            event.limit_decision = "blocked"
            return _Answer(BLOCKED)
        tokens, usd = self.tariff.charge(plan)
        tier = self.config.limits.tiers.get(profile.tier) or self.config.limits.tiers["default"]
        quota = quota_for(tier, per_ip_prefix=self.config.limits.per_ip_prefix,
                          per_fingerprint=self.config.limits.per_fingerprint)
        if standing is not None:
            quota = replace(quota, allowance=standing.allowance)
        if action.quota_share < 1.0:
            quota = quota.scaled(action.quota_share)
        decision = await self.limits.admit(AdmissionRequest(
            key_id=profile.name, quota=quota, tokens=tokens, usd=usd,
            ip_prefix=event.ip_prefix or None, fingerprint=event.fingerprint or None,
            account=None if record is None else record.account_id, rows=plan.units,
            key_account=None if record is None else record.account_id,
        ))
        if not decision.allowed:
            event.limit_decision = f"denied:{decision.denied_by}"
            if decision.denied_by in ACCOUNT_DENIALS and record and standing:
                # Added to the event clock first, so a wait to midnight ends exactly there.
                room_at = self.now + decision.retry_after - START_TS
                return _Answer(THROTTLED, capped=self._capped(record, standing), room_at=room_at)
            return _Answer(THROTTLED)
        assert decision.lease is not None
        await self.limits.settle(decision.lease, tokens, usd)  # the whole reservation is used
        return _Answer(ANSWERED, action.degrades and _felt(plan), usd)

    def _record(self, profile: ClientProfile) -> AccountRecord:
        """The client's account, signed up at ``profile.signed_up`` or else now (its first
        request)."""
        record = self._accounts.get(profile.name)
        if record is None:
            signed_up = self.now if profile.signed_up is None else START_TS + profile.signed_up
            record = self._accounts[profile.name] = AccountRecord(
                profile.name, datetime.fromtimestamp(signed_up, UTC), verified=profile.verified,
                paid_usd=profile.paid_usd)
            self.signups.observe(profile.name, record.created_at.timestamp())  # as the trust check reads it
        return record

    def _capped(self, record: AccountRecord, standing: Standing) -> tuple[str, ...]:
        """The honest frictions of a refusal by the account's allowance."""
        if standing.level != "probation":
            return ("account_budget",)
        days = (self.now - record.created_at.timestamp()) / DAY
        if days >= self.config.accounts.probation_days:
            return ("probation", "probation_after_week")
        return ("probation",)

    # -- bookkeeping ----------------------------------------------------------------

    def _note_honest(self, met: set[str], answer: _Answer, client: str) -> None:
        if answer.status == THROTTLED:
            met.add("refused")
            met.update(answer.capped)
        elif answer.status == BLOCKED:
            met.add("blocked")
        if answer.degraded:
            met.add("degraded")
        if self.actions.get(client, NORMAL).quota_share < 1.0:
            met.add("tightened")

    def _note_thief(
        self, slot: _Slot, plan: PlannedRequest, at: float, answer: _Answer,
        queue: list[tuple[float, int, PlannedRequest, str]], order: int, horizon: float,
    ) -> int:
        """Count the answer; on a refusal ask the thief what it does (retry, rotate, stop)."""
        outcome = slot.outcome
        outcome.requests += 1
        outcome.senders.add(slot.identity.name)
        status = answer.status
        if status == ANSWERED:
            outcome.usd += answer.usd
            outcome.degraded += answer.degraded
            if plan.purpose == "extraction":
                outcome.answered.append((plan, len(outcome.senders)))
            else:
                outcome.cover_answered += 1
            if outcome.usd >= slot.thief.budget.usd:
                for sibling in slot.siblings:
                    sibling.alive = False
            return order
        if status == THROTTLED:
            outcome.throttled += 1
        else:
            outcome.blocked += 1
        if at < slot.thief.horizon - (slot.thief.budget.days - EARLY_DAYS) * DAY:
            outcome.refused_early.add(slot.identity.name)
        reaction = slot.thief.react(plan, status, at)
        if reaction.rotate:
            if outcome.accounts_created >= slot.thief.budget.accounts:
                slot.alive = False
                return order
            slot.burnt += 1
            slot.identity = slot.thief.fresh_account(plan.client, slot.burnt)
            self._owner[slot.identity.name] = slot
            outcome.accounts_created += 1
        elif status == BLOCKED and reaction.retry_at is None:
            slot.alive = False  # a blocked account that gives up sends nothing more
        retry_at = reaction.retry_at
        if retry_at is not None and answer.capped and not reaction.rotate:
            retry_at = max(retry_at, answer.room_at)  # the same account: see the module docstring
        # A retry past the campaign's days is not sent (a 429 that can never pass, e.g. a
        # request larger than a tightened quota, would otherwise be retried for ever).
        if retry_at is not None and retry_at < slot.thief.horizon:
            heapq.heappush(queue, (max(retry_at, horizon), order, plan, plan.client))
            order += 1
        return order

    def _note_flag(self, verdict: Verdict) -> None:
        """Each client's worst level and why; the first alert on any of a thief's accounts:
        what it held by then."""
        if rank(verdict.level) < rank("alert"):
            return
        worst = self._worst.get(verdict.client)
        if worst is None or rank(verdict.level) > rank(worst[0]):
            self._worst[verdict.client] = (verdict.level, tuple(r.code for r in verdict.reasons))
        if verdict.client in self._flagged:
            return
        self._flagged.add(verdict.client)
        slot = self._owner.get(verdict.client)
        if slot is None:
            return
        slot.outcome.accounts_flagged += 1
        if slot.outcome.units_before_first_flag is None:
            slot.outcome.units_before_first_flag = sum(p.units for p, _ in slot.outcome.answered)
