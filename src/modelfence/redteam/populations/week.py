"""The honest week: more than 10,000 customers of a dozen kinds over seven days.

A false-positive rate means something only on traffic the thresholds were not fitted to:
detection is calibrated on the v1 population (``BenignPopulation``, ``load_prompts``);
this week sends other texts (``load_evaluation_prompts`` and ``load_evaluation_documents``)
and has the customers calibration lacks: agents with tools, students asking for
step-by-step reasoning, nightly bulk jobs, 24/7 streams, keys behind one NAT, a launch.

| segment | group | tier | requests per active day | timing (local time, own time zone ±4 h) | what it sends |
|---|---|---|---:|---|---|
| light | light | default | 12 | human sessions of ~4, diurnal | chat, 1-3 turns; 30% a system message; max_tokens absent/256/512/1024, temperature absent/0.7/1.0 |
| agent | light | default | 40 | sessions of ~8, 6 s apart | system + 1-4 ``tools``; up to 20 messages with tool calls and results; temperature 0-1; max_tokens 512/1024/2048 |
| student | light | default | 30 | sessions of ~5, a minute apart | "Explain step by step ...", "Walk me through ...", "Show your reasoning ..."; follow-ups |
| embed | light | default | 10 | sessions of ~3 | 1-16 texts |
| classify | light | default | 10 | sessions of ~3 | 1-4 digit images, its own class mix |
| launch | light | pro | 50 (1,000 on ``launch_day``) | sessions of ~3 | an app's system prompt + its users' messages |
| heavy | heavy | pro | 300 | sessions of ~15, 08:00-18:00 | chat like light, longer conversations |
| bulk-embed | bulk | pro | 782 | one job a night from ~01:00, a request every 2 s ±30% | its 50,000-entry corpus in 781 batches of 64 and one of 16 |
| bulk-score | bulk | pro | 320 | a batch every 180 s ±30%, 07:00-23:00 | 64 digit images |
| stream | 24/7 | pro | 4,320 | every ~20 s (Poisson), around the clock | one camera frame, natural repeats |
| summariser | 24/7 | pro | 1,440 | every ~60 s (Poisson), around the clock | "Summarise this ...: <document>" |
| nat | NAT | default | 20 | sessions of ~5, 09:00-18:00 | agent-like; 50 keys, ONE address and client library, one time zone |
| university | NAT | default | 15 | sessions of ~5, diurnal | student-like; keys on 4 addresses of one /24, one time zone |

Arrivals and churn (light, agent, student, embed, classify, university): ~70% of the
customers are there from the start, ~30% join at a uniform time during days 1-6 (new
customers every day), and ~10% leave at a uniform time after they joined. The others stay
all week. Rates are per day a customer is present; human timing is ``HumanTiming`` scaled to
the rate, restricted to the segment's working hours.

Accounts (what probation judges): a customer who joins during the week signs up when it
joins; of those there from the start, half signed up in the 7 days before the week
(uniform), as many a day as join each day of the week, the rest between two years and a
week before it (uniform). The pro-tier segments (launch,
heavy, bulk-embed, bulk-score, stream, summariser) and the nat enterprise are verified and
have paid $500-5,000; of light, agent, student, embed, classify and university customers
35% have paid $20-200 and the rest nothing, none verified. These draws have their own
random stream, so they change no plan.

Offline limits, stated so nobody mistakes them for behaviour: there are ~600 distinct
documents, so each bulk embedder's corpus is 50,000 entries drawn with repetition (its own
draw) from them, and the same corpus is re-embedded every night; summarisers see documents
again too. Cameras cycle through a pool of 1,024 frames (128 scenes x 8 noisy variants), so
a week of frames costs a pointer each; image batches carry nested row lists shared by
every request showing that image (OIP allows nested tensor data).

Each customer's plans depend only on ``(seed, segment, index)``, so the plans of a
stratified sample are exactly those the full week would send for the same customers.

    week = HonestWeek(FULL_COUNTS, seed=3)
    sample, weights = stratified_sample(week.customers(), {"light": 600}, rng)
    plans, profiles = week.generate(load_evaluation_prompts(), load_evaluation_documents(), sample)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from modelfence.redteam.populations.benign import ASSISTANT_STAND_IN, FOLLOW_UPS, digit_images
from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.timing import DAY, HumanTiming, SteadyTiming, diurnal_weight
from modelfence.redteam.traffic import (
    CHAT,
    DIGITS_INFER,
    EMBEDDINGS,
    ClientProfile,
    PlannedRequest,
    chat_body,
    digits_body,
    embeddings_body,
    make_profile,
)

HOUR = 3_600.0
GROUPS = ("light", "heavy", "bulk", "24/7", "NAT")
BASE_SUBNET = 20_000  # clear of the v1 population's and the attackers' /24s
SHARED = 1 << 31  # the seed-sequence index of what a segment's keys share (never a customer's)
HUMAN_MEAN_WEIGHT = 0.4  # HumanTiming divides its peak session rate by this
NEW_CONVERSATION_GAP = 600.0  # seconds of silence after which a person starts afresh
BULK_DOCUMENTS = 50_000
BULK_BATCH = 64
BULK_GAP = 2.0
BULK_HOUR = 1.0  # local time the nightly job starts (within 15 minutes)
SCORE_GAP = 180.0
JITTER = 0.3  # bulk jobs' gaps: uniform within ±30%
STREAM_GAP = 20.0
SUMMARY_GAP = 60.0
LAUNCH_FACTOR = 20
ARRIVALS, ACCOUNT = 1, 2  # the seed-sequence tails of a customer's arrival and account draws
VERIFIED = ("launch", "heavy", "bulk-embed", "bulk-score", "stream", "summariser", "nat")
VERIFIED_PAID = (500.0, 5_000.0)  # dollars paid to date, uniform
PAYING_SHARE = 0.35  # of the other segments' customers
PAYING_PAID = (20.0, 200.0)
# Days before the week a customer there from the start signed up, uniform from the first
# to the second: in the week before for half of them, else up to two years before. Half
# makes a steady business: the week before saw about as many sign-ups a day (~500 in the
# full week) as each day of the week does from day 1 on (a sign-up surge watch compares them).
RECENT_SIGNUP_SHARE = 0.5
RECENT_SIGNUP = (7.0, 0.0)
EARLIER_SIGNUP = (730.0, 7.0)


@dataclass(frozen=True, slots=True)
class Segment:
    """One kind of customer: its report group, tier, stated rate and session shape."""

    name: str
    group: str
    tier: str
    rate: float  # requests per day present (the module docstring's table)
    capacity: int  # /24s reserved for it (nat and university share one)
    churns: bool = False
    per_session: float = 4.0
    think: float = 25.0  # median seconds between a session's requests
    hours: tuple[float, float] = (0.0, 24.0)  # the local hours it works


SEGMENTS: tuple[Segment, ...] = (
    Segment("light", "light", "default", 12, 9_000, churns=True),
    Segment("agent", "light", "default", 40, 2_000, churns=True, per_session=8, think=6),
    Segment("student", "light", "default", 30, 2_000, churns=True, per_session=5, think=60),
    Segment("embed", "light", "default", 10, 1_000, churns=True, per_session=3, think=20),
    Segment("classify", "light", "default", 10, 1_000, churns=True, per_session=3, think=20),
    Segment("launch", "light", "pro", 50, 500, per_session=3, think=30),
    Segment("heavy", "heavy", "pro", 300, 1_000, per_session=15, think=40, hours=(8, 18)),
    Segment("bulk-embed", "bulk", "pro", math.ceil(BULK_DOCUMENTS / BULK_BATCH), 200),
    Segment("bulk-score", "bulk", "pro", 16 * HOUR / SCORE_GAP, 200, hours=(7, 23)),
    Segment("stream", "24/7", "pro", DAY / STREAM_GAP, 200),
    Segment("summariser", "24/7", "pro", DAY / SUMMARY_GAP, 200),
    Segment("nat", "NAT", "default", 20, 1, per_session=5, think=8, hours=(9, 18)),
    Segment("university", "NAT", "default", 15, 1, churns=True, per_session=5, think=60),
)
SEGMENT = {s.name: s for s in SEGMENTS}
GROUP_OF = {s.name: s.group for s in SEGMENTS}
WHOLE = ("nat", "university")  # sampled whole: their keys share addresses
_NUMBER = {s.name: i for i, s in enumerate(SEGMENTS)}
_FIRST_SUBNET = {s.name: BASE_SUBNET + sum(t.capacity for t in SEGMENTS[:i]) for i, s in enumerate(SEGMENTS)}

FULL_COUNTS: dict[str, int] = {
    "light": 6_600, "agent": 900, "student": 900, "embed": 500, "classify": 500, "university": 300,
    "nat": 50, "launch": 50, "heavy": 100, "bulk-embed": 20, "bulk-score": 40, "stream": 40, "summariser": 20,
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer concisely.",
    "You are a friendly assistant for a small business. Keep answers short and practical.",
    "You are an expert technical assistant. Explain things in plain English.",
    "Answer as briefly as you can, without preamble.",
)
APP_PROMPTS = (
    "You are the in-app assistant of a travel booking app. Help users plan and change their trips.",
    "You are the support assistant of a note-taking app. Be friendly and brief.",
    "You are a shopping assistant inside an online store's mobile app.",
    "You are a study buddy inside a language-learning app. Encourage the learner.",
    "You are the help desk of a personal finance app. Never give investment advice.",
)
AGENT_PROMPTS = (
    "You are an autonomous agent. Use the available tools to complete the user's task, then report the result.",
    "You are a customer-service agent. Look facts up with your tools before you answer.",
    "You are a coding assistant with access to the repository through tools.",
    "You are an operations assistant. Prefer tools over guessing and ask before irreversible actions.",
)
AGENT_FOLLOW_UPS = (
    "Go ahead.",
    "Yes, continue with the next step.",
    "That didn't work. Try another way.",
    "Can you double-check the result?",
    "Now summarise what you did.",
    "Stop there and tell me what you found.",
)
STUDENT_TEMPLATES = (
    "Explain step by step: {}",
    "Walk me through this: {}",
    "Show your reasoning: {}",
    "{} Think it through step by step.",
    "Can you break this down into steps for me? {}",
    "I'm studying for an exam. {} Please explain each step.",
    "Let's work through this one step at a time. {}",
    "{} Explain your reasoning as if you were teaching a class.",
)
STUDENT_FOLLOW_UPS = (
    "Why does that step follow from the one before?",
    "Can you go over the second step again, more slowly?",
    "What would change if the assumption were different?",
    "Can you give me a similar practice question?",
    "So what is the final answer?",
    "I don't get the last part. Can you explain it another way?",
    "Can you show your reasoning for that part too?",
    "Thanks! Can you list the steps again in short?",
)
SUMMARY_TEMPLATES = (
    "Summarise this for our team wiki: {}",
    "Summarise this support case in two sentences: {}",
    "Summarise this for the weekly report, in three bullet points: {}",
    "Summarise this and list any action items: {}",
)
AGENT_SOURCES = ("mind2web", "tau2", "swelancer", "agentbench", "support_tickets")
STUDENT_SOURCES = ("threat_intel", "malware_analysis", "mind2web", "agentbench", "swelancer")

# name -> (description, parameters, the arguments of a typical call, a result stand-in)
TOOLS: dict[str, tuple[str, dict[str, str], str, str]] = {
    "search_web": ("Search the web and return the top results.", {"query": "string"},
                   '{"query": "opening hours"}', '{"results": [{"title": "Opening hours", "snippet": "9-5"}]}'),
    "get_weather": ("Current weather for a city.", {"city": "string"},
                    '{"city": "Lisbon"}', '{"temperature_c": 21, "sky": "clear"}'),
    "lookup_order": ("Look up an order by its id.", {"order_id": "string"},
                     '{"order_id": "W2378156"}', '{"status": "delivered", "items": 2}'),
    "create_ticket": ("Open a support ticket.", {"title": "string", "body": "string"},
                      '{"title": "Login fails", "body": "See conversation"}', '{"ticket": 4821}'),
    "run_sql": ("Run a read-only SQL query on the analytics database.", {"query": "string"},
                '{"query": "select count(*) from orders"}', '{"rows": [[1342]]}'),
    "read_file": ("Read a file of the repository.", {"path": "string"},
                  '{"path": "src/app.py"}', '{"content": "def main():\\n    ..."}'),
    "send_email": ("Send an email.", {"to": "string", "subject": "string", "body": "string"},
                   '{"to": "team@example.com", "subject": "Update", "body": "Done."}', '{"sent": true}'),
    "get_calendar": ("List calendar events of a day.", {"date": "string"},
                     '{"date": "2026-01-05"}', '{"events": [{"at": "10:00", "title": "Standup"}]}'),
}


def _tool_definition(name: str) -> dict[str, Any]:
    description, parameters, _, _ = TOOLS[name]
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in parameters.items()},
                       "required": list(parameters)},
    }}


def _tool_turns(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An assistant's call of tool ``name`` and the tool's answer, as the next request carries them."""
    _, _, arguments, result = TOOLS[name]
    call_id = f"call_{name}"
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    return call, {"role": "tool", "tool_call_id": call_id, "content": result}


@dataclass(frozen=True, slots=True)
class Customer:
    """One honest customer: when it is a customer (``joined`` to ``left``, virtual seconds)."""

    name: str
    segment: str
    group: str
    index: int
    joined: float
    left: float


class Account(NamedTuple):
    """What a customer's trust is judged on, as ``ClientProfile`` carries it."""

    signed_up: float  # virtual seconds; negative: before the week
    paid_usd: float
    verified: bool


Build = Callable[[Customer, np.random.Generator, float], list[PlannedRequest]]


@cache
def _diurnal_mass(start_hour: float, end_hour: float) -> float:
    """∫ diurnal_weight over the local hours [start, end), as a fraction of a day."""
    minutes = np.arange(start_hour * 60, end_hour * 60) + 0.5
    return float(sum(diurnal_weight(m * 60) for m in minutes)) / 1_440


@cache
def _images() -> tuple[list[list[float]], np.ndarray, dict[str, Any]]:
    """Each bundled digit as a row list (shared by every request showing it), the labels,
    and a ``digits_body`` whose envelope the batches reuse."""
    x, y = digit_images()
    return [digits_body(row)["inputs"][0]["data"] for row in x], y, digits_body(x[:1])


def _images_body(rows: list[list[float]]) -> dict[str, Any]:
    """A ``digits_body`` request with its tensor nested row by row."""
    envelope = _images()[2]
    return {**envelope, "inputs": [{**envelope["inputs"][0], "shape": [len(rows), 64], "data": rows}]}


def _chat(messages: list[dict[str, Any]], max_tokens: int | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """``chat_body``, without ``max_tokens`` when the client leaves it to the server."""
    body = chat_body(messages, max_tokens or 0, **extra)
    if max_tokens is None:
        del body["max_tokens"]
    return body


def _split(values: list[Any], counts: np.ndarray) -> list[list[Any]]:
    """``values`` cut into consecutive pieces of ``counts`` items."""
    ends = np.cumsum(counts)
    return [values[a:b] for a, b in zip((ends - counts).tolist(), ends.tolist(), strict=True)]


@dataclass(frozen=True, slots=True)
class HonestWeek:
    """How many customers of each segment (``counts``), for how long, launching when."""

    counts: Mapping[str, int]
    days: float = 7.0
    launch_day: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name, count in self.counts.items():
            if name not in SEGMENT:
                raise ValueError(f"unknown segment {name!r}; segments: {', '.join(SEGMENT)}")
            if count > SEGMENT[name].capacity and name not in WHOLE:
                raise ValueError(f"at most {SEGMENT[name].capacity} {name} customers (their /24s)")

    @property
    def horizon(self) -> float:
        return self.days * DAY

    def customers(self) -> list[Customer]:
        """The whole population with arrival and churn times; no plans."""
        out = []
        for segment in SEGMENTS:
            for index in range(self.counts.get(segment.name, 0)):
                joined, left = 0.0, self.horizon
                if segment.churns:
                    late, join_at, churn, leave_at = np.random.default_rng(
                        [self.seed, _NUMBER[segment.name], index, ARRIVALS]).random(4)
                    if late < 0.3 and self.horizon > DAY:
                        joined = DAY + join_at * (self.horizon - DAY)
                    if churn < 0.1:
                        left = joined + leave_at * (self.horizon - joined)
                out.append(Customer(f"honest-{segment.name}-{index}", segment.name, segment.group, index,
                                    joined, left))
        return out

    def account(self, customer: Customer) -> Account:
        """The customer's account (see the module docstring)."""
        recent, when, pays, amount = np.random.default_rng(
            [self.seed, _NUMBER[customer.segment], customer.index, ACCOUNT]).random(4)
        if customer.joined > 0:
            signed_up = float(customer.joined)
        else:
            days = RECENT_SIGNUP if recent < RECENT_SIGNUP_SHARE else EARLIER_SIGNUP
            signed_up = -DAY * _between(days, when)
        verified = customer.segment in VERIFIED
        if verified:
            paid = _between(VERIFIED_PAID, amount)
        else:
            paid = _between(PAYING_PAID, amount) if pays < PAYING_SHARE else 0.0
        return Account(signed_up, round(paid, 2), verified)

    def generate(
        self, corpus: PromptCorpus, documents: Sequence[str], customers: Sequence[Customer]
    ) -> tuple[list[PlannedRequest], list[ClientProfile]]:
        """Plans (in time order) and profiles of ``customers``; see the module docstring."""
        builder = _Builder(self, corpus, documents)
        plans: list[PlannedRequest] = []
        profiles: list[ClientProfile] = []
        for customer in customers:
            rng = np.random.default_rng([self.seed, _NUMBER[customer.segment], customer.index])
            profile = builder.profile(customer, rng)
            account = self.account(customer)
            profiles.append(replace(profile, signed_up=account.signed_up, paid_usd=account.paid_usd,
                                    verified=account.verified))
            plans.extend(builder.plans(customer, rng))
        plans.sort(key=attrgetter("at"))
        return plans, profiles


def _between(bounds: tuple[float, float], share: float) -> float:
    """The point ``share`` of the way from the first bound to the second."""
    start, end = bounds
    return float(start + share * (end - start))


def stratified_sample(
    customers: Sequence[Customer], sizes: Mapping[str, int], rng: np.random.Generator
) -> tuple[list[Customer], dict[str, float]]:
    """Per segment a uniform sample of ``min(size, N)`` customers (segments not in ``sizes``,
    and nat and university, whole) and each segment's weight ``N / n``."""
    by_segment: dict[str, list[Customer]] = {}
    for customer in customers:
        by_segment.setdefault(customer.segment, []).append(customer)
    sample: list[Customer] = []
    weights: dict[str, float] = {}
    for name, members in by_segment.items():
        size = len(members) if name in WHOLE or name not in sizes else min(sizes[name], len(members))
        if size == 0:
            continue
        picked = np.sort(rng.choice(len(members), size=size, replace=False))
        sample.extend(members[i] for i in picked.tolist())
        weights[name] = len(members) / size
    return sample, weights


class _Builder:
    """The plans of one ``generate`` call: each segment's customers, one at a time."""

    def __init__(self, week: HonestWeek, corpus: PromptCorpus, documents: Sequence[str]) -> None:
        self.week = week
        self.sources = {name: texts for name, texts in corpus.by_source.items() if texts}
        self.documents = documents
        self.horizon = week.horizon
        nat, university = (np.random.default_rng([week.seed, _NUMBER[name], SHARED]) for name in WHOLE)
        # One office and one campus: one time zone each; the campus NAT pool has 4 addresses.
        self.shared_phase = {"nat": float(nat.uniform(-4, 4)) * HOUR,
                             "university": float(university.uniform(-4, 4)) * HOUR}
        self.campus_hosts = (university.choice(254, size=4, replace=False) + 1).tolist()

    # -- who ---------------------------------------------------------------------------

    def profile(self, customer: Customer, rng: np.random.Generator) -> ClientProfile:
        segment = SEGMENT[customer.segment]
        subnet = _FIRST_SUBNET[segment.name] + (0 if segment.name in WHOLE else customer.index)
        host = self.campus_hosts[int(rng.integers(4))] if segment.name == "university" else None
        if segment.name == "nat":  # every key: the same address and corporate client library
            rng = np.random.default_rng([self.week.seed, _NUMBER["nat"], SHARED, 1])
        return make_profile(rng, customer.name, "benign", subnet=subnet, host=host, tier=segment.tier,
                            segment=segment.name)

    def plans(self, customer: Customer, rng: np.random.Generator) -> list[PlannedRequest]:
        phase = self.shared_phase.get(customer.segment)
        if phase is None:
            phase = float(rng.uniform(-4, 4)) * HOUR
        build: Build = getattr(self, "_" + customer.segment.replace("-", "_"))
        return build(customer, rng, phase)

    # -- when --------------------------------------------------------------------------

    def _human(self, segment: Segment, rng: np.random.Generator, start: float, end: float, phase: float,
               rate: float | None = None) -> list[float]:
        """``HumanTiming`` arrivals in [start, end) at ``rate`` a day (the segment's by
        default), inside the segment's local working hours, in time order."""
        low, high = segment.hours
        sessions = (segment.rate if rate is None else rate) / segment.per_session
        timing = HumanTiming(sessions_per_day=sessions * HUMAN_MEAN_WEIGHT / _diurnal_mass(low, high),
                             requests_per_session=segment.per_session, think_median=segment.think)
        times = sorted(start + t for t in timing.arrivals(rng, end - start, phase + start))
        if (low, high) == (0.0, 24.0):
            return times
        return [t for t in times if low * HOUR <= (t + phase) % DAY < high * HOUR]

    def _present(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[float]:
        return self._human(SEGMENT[customer.segment], rng, customer.joined, customer.left, phase)

    def _daily(self, phase: float, hour: float) -> list[float]:
        """Virtual times of local ``hour`` on every day that touches the week."""
        return [d * DAY + hour * HOUR - phase for d in range(-1, math.ceil(self.week.days) + 1)]

    # -- what: chat --------------------------------------------------------------------

    def _topic(self, rng: np.random.Generator, names: Sequence[str] = (), width: int = 40) -> Sequence[str]:
        """A person's interests: a contiguous slice of one source (files group by theme)."""
        pool = [self.sources[n] for n in names if n in self.sources] or list(self.sources.values())
        texts = pool[int(rng.integers(len(pool)))]
        width = min(len(texts), width)
        start = int(rng.integers(0, len(texts) - width + 1))
        return texts[start : start + width]

    def _conversations(
        self, name: str, rng: np.random.Generator, times: Sequence[float], openers: Sequence[str],
        follow_ups: Sequence[str], *, system: str | None, new_chance: float, max_messages: int,
        max_tokens: int | None, extra: Mapping[str, Any],
    ) -> list[PlannedRequest]:
        """People chatting: a new conversation after a pause, at random or when it grows
        long, else a follow-up carrying the earlier turns (assistant turns are stand-ins)."""
        n = len(times)
        fresh = (rng.random(n) < new_chance).tolist()
        pick = rng.integers(len(openers), size=n).tolist()
        follow = rng.integers(len(follow_ups), size=n).tolist()
        head = [{"role": "system", "content": system}] if system else []
        answer = {"role": "assistant", "content": ASSISTANT_STAND_IN}
        asks = [{"role": "user", "content": text} for text in follow_ups]
        plans = []
        messages: list[dict[str, Any]] = []
        last = -math.inf
        for i, at in enumerate(times):
            if fresh[i] or not messages or at - last > NEW_CONVERSATION_GAP or len(messages) + 2 > max_messages:
                messages = [*head, {"role": "user", "content": openers[pick[i]]}]
            else:
                messages = [*messages, answer, asks[follow[i]]]
            last = at
            plans.append(PlannedRequest(at, name, CHAT, _chat(messages, max_tokens, extra), turns=len(messages)))
        return plans

    def _light(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))] if rng.random() < 0.3 else None
        max_tokens = (None, 256, 512, 1024)[int(rng.integers(4))]
        temperature = (None, 0.7, 1.0)[int(rng.integers(3))]
        return self._conversations(
            customer.name, rng, self._present(customer, rng, phase), self._topic(rng), FOLLOW_UPS,
            system=system, new_chance=0.5, max_messages=6, max_tokens=max_tokens,
            extra={} if temperature is None else {"temperature": temperature})

    def _heavy(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))] if rng.random() < 0.5 else None
        return self._conversations(
            customer.name, rng, self._present(customer, rng, phase), self._topic(rng, width=120), FOLLOW_UPS,
            system=system, new_chance=0.4, max_messages=10, max_tokens=(512, 1024)[int(rng.integers(2))],
            extra={"temperature": 0.7})

    def _student(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        styles = rng.choice(len(STUDENT_TEMPLATES), size=3, replace=False).tolist()  # a student's own phrasings
        topic = self._topic(rng, STUDENT_SOURCES)
        openers = [STUDENT_TEMPLATES[s].format(text) for s in styles for text in topic]
        return self._conversations(
            customer.name, rng, self._present(customer, rng, phase), openers, STUDENT_FOLLOW_UPS,
            system=None, new_chance=0.35, max_messages=8, max_tokens=(None, 512, 1024)[int(rng.integers(3))],
            extra={})

    _university = _student

    def _launch(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        segment = SEGMENT["launch"]
        times = [
            t for day in range(math.ceil(self.week.days))
            for t in self._human(segment, rng, day * DAY, min((day + 1) * DAY, self.horizon), phase,
                                 segment.rate * (LAUNCH_FACTOR if day == self.week.launch_day else 1))
        ]
        return self._conversations(
            customer.name, rng, times, self._topic(rng), FOLLOW_UPS,
            system=APP_PROMPTS[int(rng.integers(len(APP_PROMPTS)))], new_chance=0.8, max_messages=5,
            max_tokens=(256, 512)[int(rng.integers(2))], extra={"temperature": 0.7})

    def _agent(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        """An agent loop: the task, then tool calls and results (or a follow-up), up to 20
        messages; one system prompt, tool set, temperature and max_tokens per customer."""
        names = list(TOOLS)
        chosen = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 5)), replace=False).tolist()]
        extra = {"tools": [_tool_definition(n) for n in chosen], "temperature": round(float(rng.uniform(0, 1)), 2)}
        max_tokens = (512, 1024, 2048)[int(rng.integers(3))]
        head = [{"role": "system", "content": AGENT_PROMPTS[int(rng.integers(len(AGENT_PROMPTS)))]}]
        tasks = self._topic(rng, AGENT_SOURCES)
        steps = [_tool_turns(n) for n in chosen] + [
            ({"role": "assistant", "content": ASSISTANT_STAND_IN}, {"role": "user", "content": text})
            for text in AGENT_FOLLOW_UPS
        ]
        times = self._present(customer, rng, phase)
        n = len(times)
        fresh = (rng.random(n) < 0.1).tolist()
        task = rng.integers(len(tasks), size=n).tolist()
        uses_tool = (rng.random(n) < 0.7).tolist()
        tool = rng.integers(len(chosen), size=n).tolist()
        follow = rng.integers(len(chosen), len(steps), size=n).tolist()
        plans = []
        messages: list[dict[str, Any]] = []
        last = -math.inf
        for i, at in enumerate(times):
            if fresh[i] or not messages or at - last > NEW_CONVERSATION_GAP or len(messages) + 2 > 20:
                messages = [*head, {"role": "user", "content": tasks[task[i]]}]
            else:
                messages = [*messages, *steps[tool[i] if uses_tool[i] else follow[i]]]
            last = at
            plans.append(PlannedRequest(at, customer.name, CHAT, _chat(messages, max_tokens, extra),
                                        turns=len(messages)))
        return plans

    _nat = _agent

    def _summariser(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        """A pipeline summarising documents around the clock: one prompt template and one
        max_tokens; a document seen again is the same request again."""
        template = SUMMARY_TEMPLATES[int(rng.integers(len(SUMMARY_TEMPLATES)))]
        max_tokens = (256, 512)[int(rng.integers(2))]
        times = SteadyTiming(1 / SUMMARY_GAP).arrivals(rng, self.horizon)
        bodies: dict[int, dict[str, Any]] = {}
        plans = []
        for at, doc in zip(times, rng.integers(len(self.documents), size=len(times)).tolist(), strict=True):
            body = bodies.get(doc)
            if body is None:
                body = bodies[doc] = chat_body(
                    [{"role": "user", "content": template.format(self.documents[doc])}], max_tokens)
            plans.append(PlannedRequest(at, customer.name, CHAT, body, turns=1))
        return plans

    # -- what: embeddings and images ---------------------------------------------------

    def _embed(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        topic = self._topic(rng)
        times = self._present(customer, rng, phase)
        counts = rng.integers(1, 17, size=len(times))
        texts = [topic[i] for i in rng.integers(len(topic), size=int(counts.sum())).tolist()]
        return [PlannedRequest(at, customer.name, EMBEDDINGS, embeddings_body(batch))
                for at, batch in zip(times, _split(texts, counts), strict=True)]

    def _bulk_embed(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        """Every night from ~01:00 local, the same 50,000-entry corpus in batches of 64."""
        corpus = [self.documents[i] for i in rng.integers(len(self.documents), size=BULK_DOCUMENTS).tolist()]
        bodies = [embeddings_body(corpus[i : i + BULK_BATCH]) for i in range(0, BULK_DOCUMENTS, BULK_BATCH)]
        plans = []
        for start in self._daily(phase, BULK_HOUR):
            start += float(rng.uniform(0, 900))
            gaps = BULK_GAP * rng.uniform(1 - JITTER, 1 + JITTER, size=len(bodies) - 1)
            times = (start + np.concatenate([[0.0], np.cumsum(gaps)])).tolist()
            if 0 <= start < self.horizon:
                plans += [PlannedRequest(at, customer.name, EMBEDDINGS, body)
                          for at, body in zip(times, bodies, strict=True) if at < self.horizon]
        return plans

    def _mix(self, rng: np.random.Generator) -> np.ndarray:
        """Image choice probabilities: each customer sees its own class mix."""
        _, y, _ = _images()
        weights = rng.dirichlet(np.full(10, 0.8))[y]
        return np.asarray(weights / weights.sum())

    def _classify(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        rows, _, _ = _images()
        p = self._mix(rng)
        times = self._present(customer, rng, phase)
        counts = rng.integers(1, 5, size=len(times))
        shown = [rows[i] for i in rng.choice(len(rows), size=int(counts.sum()), p=p).tolist()]
        return [PlannedRequest(at, customer.name, DIGITS_INFER, _images_body(batch))
                for at, batch in zip(times, _split(shown, counts), strict=True)]

    def _bulk_score(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        """A 64-image batch every ~180 s (±30%) from 07:00 to 23:00 local."""
        rows, _, _ = _images()
        p = self._mix(rng)
        low, high = SEGMENT["bulk-score"].hours
        per_day = math.ceil((high - low) * HOUR / (SCORE_GAP * (1 - JITTER)))
        times: list[float] = []
        for opens in self._daily(phase, low):
            gaps = SCORE_GAP * rng.uniform(1 - JITTER, 1 + JITTER, size=per_day)
            day = opens + float(rng.uniform(0, SCORE_GAP)) + np.cumsum(gaps) - gaps[0]
            times += [t for t in day.tolist() if t < opens + (high - low) * HOUR and 0 <= t < self.horizon]
        shown = [rows[i] for i in rng.choice(len(rows), size=BULK_BATCH * len(times), p=p).tolist()]
        batches = [shown[k : k + BULK_BATCH] for k in range(0, len(shown), BULK_BATCH)]
        return [PlannedRequest(at, customer.name, DIGITS_INFER, _images_body(batch))
                for at, batch in zip(times, batches, strict=True)]

    def _stream(self, customer: Customer, rng: np.random.Generator, phase: float) -> list[PlannedRequest]:
        """A camera: one frame every ~20 s; 30% of the time the scene has not changed and the
        frame is a fresh noisy (or the very same) view of it."""
        x, _ = digit_images()
        scenes = rng.choice(len(x), size=128, p=self._mix(rng))
        variants = 8
        pool = [digits_body(np.clip(x[s] + rng.normal(0, 0.3, size=64), 0, 16))
                for s in scenes.tolist() for _ in range(variants)]
        times = SteadyTiming(1 / STREAM_GAP).arrivals(rng, self.horizon)
        n = len(times)
        changed = rng.random(n) >= 0.3
        changed[0] = True
        scene = rng.integers(len(scenes), size=n)[np.maximum.accumulate(np.where(changed, np.arange(n), 0))]
        frame = (scene * variants + rng.integers(variants, size=n)).tolist()
        return [PlannedRequest(at, customer.name, DIGITS_INFER, pool[k])
                for at, k in zip(times, frame, strict=True)]

