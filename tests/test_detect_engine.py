"""The detection engine on whole streams: risk, reasons, entities, accumulation, overrides."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from modelfence.config import DetectionConfig
from modelfence.detect import engine as engine_module
from modelfence.detect.actions import Policy
from modelfence.detect.detectors import Signal
from modelfence.detect.engine import DetectionEngine, Verdict
from modelfence.detect.risk import RiskState
from modelfence.detect.traffic import MIN_ROWS, REMAKE_ROWS
from modelfence.telemetry.events import RequestEvent

from .test_detect_streams import OIP, benign_chat, harvester, natural_vectors, perturbation_sweep
from .test_detect_streams import event as oip_event

CONFIG = DetectionConfig(evaluate_every=10)


def replay(
    engine: DetectionEngine, events: list[RequestEvent], batch: int = 50
) -> dict[str, Verdict]:
    latest: dict[str, Verdict] = {}
    events = sorted(events, key=lambda e: e.ts)
    for i in range(0, len(events), batch):
        latest.update((v.client, v) for v in engine.process(events[i : i + batch]))
    return latest


def first_flag(engine: DetectionEngine, events: list[RequestEvent], client: str) -> int | None:
    """How many of ``client``'s queries the engine saw before it first reached ``alert``."""
    seen = 0
    for e in sorted(events, key=lambda e: e.ts):
        seen += e.client == client
        for v in engine.process([e]):
            if v.client == client and v.level != "normal":
                return seen
    return None


def test_a_harvester_is_blocked_with_reasons_while_people_pass() -> None:
    engine = DetectionEngine(CONFIG)
    events = harvester("thief", 200, seed=1)
    for i in range(20):
        events += benign_chat(f"user{i}", 60, seed=100 + i)
    verdicts = replay(engine, events)
    thief = verdicts["thief"]
    assert thief.level == "block" and thief.risk >= 0.9
    assert {r.code for r in thief.reasons} >= {"llm_harvesting", "machine_timing"}
    assert all(r.text for r in thief.reasons)
    assert all(verdicts[f"user{i}"].level == "normal" for i in range(20))


def test_queries_before_the_first_flag() -> None:
    assert (
        first_flag(DetectionEngine(CONFIG), harvester("thief", 200, seed=1), "thief") or 999
    ) <= 50
    assert (
        first_flag(DetectionEngine(CONFIG), perturbation_sweep("thief", 200, seed=1), "thief")
        or 999
    ) <= 50


def test_a_botnet_whose_keys_each_look_quiet_is_caught_as_an_entity() -> None:
    engine = DetectionEngine(CONFIG)
    events = []
    for i in range(6):  # 6 keys behind one network, 15 queries each: too few to judge one key
        events += [
            RequestEvent(**{**e.to_dict(), "ip_prefix": "203.0.113.0/24"})
            for e in perturbation_sweep(f"bot{i}", 15, seed=i, start=i * 0.5)
        ]
    events += benign_chat("user", 60, seed=5)
    verdicts = replay(engine, events, batch=10)
    bots = [verdicts[f"bot{i}"] for i in range(6)]
    assert all(v.entity_members == 6 and v.level != "normal" for v in bots)
    assert len({v.entity for v in bots}) == 1
    assert any("entity of 6 keys" in r.text for r in bots[0].reasons)
    # Entity budgets: the members share one tightened budget.
    tightened = [v for v in bots if v.action.quota_share < 1]
    assert all(v.action.quota_share <= 0.25 / 6 + 1e-9 for v in tightened)
    assert verdicts["user"].level == "normal" and verdicts["user"].entity != bots[0].entity


def test_weak_evidence_that_keeps_coming_adds_up_then_decays() -> None:
    state = RiskState(half_life_seconds=3600.0)
    weak = [Signal("x", 0.3, "weak")]
    risks = [state.update(weak, now=float(t)) for t in range(30)]
    assert risks[0] < 0.3 and risks[-1] > 0.9  # low and slow is caught eventually
    assert [r.code for r in state.top_reasons()] == ["x"]
    for t in range(30, 60):
        state.update([], now=float(t))  # back to normal: drift pulls it down
    assert state.risk < risks[-1]
    state.update([], now=60.0 + 3 * 24 * 3600)  # and idle time decays the rest
    assert state.risk < 0.05 and state.top_reasons() == []


def test_steps_of_one_evaluation_add_up_as_that_many_evaluations_at_once() -> None:
    """An entity evaluated once for several members' evaluations takes a step for each:
    the same CUSUM, floor and reasons' fading as that many updates at one time."""
    for signals in ([Signal("x", 0.3, "weak")], [Signal("x", 0.05, "faint")], []):
        stepped, one_by_one = RiskState(3600.0), RiskState(3600.0)
        for state in (stepped, one_by_one):
            state.update([Signal("x", 0.6, "strong")], now=0.0)
        stepped.update(signals, now=100.0, steps=3)
        for _ in range(3):
            one_by_one.update(signals, now=100.0)
        assert stepped.cusum == pytest.approx(one_by_one.cusum)
        assert stepped.reasons["x"].score == pytest.approx(one_by_one.reasons["x"].score)


def test_overrides_and_the_allow_list_win_over_the_detector() -> None:
    engine = DetectionEngine(DetectionConfig(evaluate_every=10, allow_list=("partner",)))
    engine.overrides = {"thief": "allow", "user": "block"}
    events = harvester("thief", 100, seed=1) + harvester("partner", 100, seed=2)
    events += benign_chat("user", 30, seed=3)
    verdicts = replay(engine, events)
    assert verdicts["thief"].level == "normal" and verdicts["thief"].risk > 0.9
    assert verdicts["partner"].level == "normal"
    assert verdicts["user"].level == "block"


def test_the_action_ladder_follows_the_tier_thresholds() -> None:
    policy = Policy(DetectionConfig())
    assert [policy.level_for(r, "default") for r in (0.1, 0.35, 0.6, 0.8, 0.95)] == [
        "normal",
        "alert",
        "tighten",
        "degrade",
        "block",
    ]
    assert policy.action("tighten", "default").quota_share == 0.25
    assert policy.action("alert", "default").quota_share == 1.0


def test_verdicts_do_not_depend_on_batching() -> None:
    events = harvester("thief", 120, seed=1) + benign_chat("user", 60, seed=2)
    one_by_one = replay(DetectionEngine(CONFIG), events, batch=1)
    all_at_once = replay(DetectionEngine(CONFIG), events, batch=len(events))
    assert {c: (v.level, round(v.risk, 6)) for c, v in one_by_one.items()} == {
        c: (v.level, round(v.risk, 6)) for c, v in all_at_once.items()
    }


def test_an_established_honest_key_does_not_inherit_its_networks_risk() -> None:
    engine = DetectionEngine(CONFIG)
    shared = {"ip_prefix": "198.51.100.0/24"}
    honest = benign_chat("office-user", 40, seed=3, **shared)  # 40 queries before the thief
    thief = [
        RequestEvent(**{**e.to_dict(), **shared})
        for e in harvester("thief", 120, seed=1, start=honest[-1].ts + 1)
    ]
    newcomer = benign_chat("newcomer", 5, seed=4, start=honest[-1].ts + 100, **shared)
    verdicts = replay(engine, honest + thief + newcomer)
    assert verdicts["thief"].level == "block"
    assert verdicts["office-user"].entity == verdicts["thief"].entity
    assert verdicts["office-user"].level == "normal"


def test_a_batched_sweep_counts_one_query_per_row_and_is_caught_as_early() -> None:
    """64 images in one request are 64 queries, with their own margins."""
    single = perturbation_sweep("thief", 160, seed=1)
    batched = [
        RequestEvent(**{
            **chunk[0].to_dict(),
            "input_rows": [row for e in chunk for row in e.input_rows or []],
            "output_margins": [m for e in chunk for m in e.output_margins or []],
        })
        for chunk in (single[i : i + 16] for i in range(0, len(single), 16))
    ]
    verdict = replay(DetectionEngine(CONFIG), batched)["thief"]
    assert verdict.queries == 160
    assert verdict.level != "normal"
    assert {r.code for r in verdict.reasons} & {"boundary_probing", "perturbation_sweep", "prada_distance"}
    rows_seen = 0
    engine = DetectionEngine(CONFIG)
    for event in batched:
        rows_seen += len(event.input_rows or [])
        if any(v.level != "normal" for v in engine.process([event])):
            break
    assert rows_seen <= 64


def test_an_embeddings_batch_counts_every_text() -> None:
    (event,) = benign_chat("emb", 1, seed=3)
    event.route, event.input_texts = "/v1/embeddings", ["first text", "second", "third"]
    verdicts = DetectionEngine(DetectionConfig(evaluate_every=1)).process([event])
    assert verdicts[0].queries == 3


def test_keys_working_in_lockstep_are_linked_without_sharing_a_network() -> None:
    """A Sybil campaign: distinct addresses and fingerprints, one script, round-robin, among
    honest customers busy in the same minutes on the same model. Without a reference, keys
    are compared by how their queries differ from all the traffic: the raw means and
    spreads of any two sets of natural inputs agree, and every young key busy in the same
    minutes as the campaign was linked to it, honest ones too."""
    def shifted(e: RequestEvent, **fields: Any) -> RequestEvent:
        # Inputs away from 0, as pixels and most features are: a rule comparing plain
        # means would find every key alike.
        rows = [[v + 5.0 for v in row] for row in e.input_rows or []]
        return RequestEvent(**{**e.to_dict(), "input_rows": rows, **fields})

    sweep = perturbation_sweep("script", 120, seed=7)
    bots = [
        shifted(e, client=f"sybil{i % 4}", ip_prefix=f"ip-s{i % 4}", fingerprint=f"fp-s{i % 4}", ts=i * 1.0)
        for i, e in enumerate(sweep)
    ]
    busy = [
        shifted(e, ip_prefix=f"ip-{e.client}", fingerprint=f"fp-{e.client}", ts=i * 3.0 + n)
        for n in range(3)
        for i, e in enumerate(natural_vectors(f"busy{n}", 40, seed=10 + n))
    ]
    # Two honest keys with the same kind of inputs, busy at other times.
    honest = [shifted(e) for e in natural_vectors("early", 40, seed=1) + natural_vectors("late", 40, seed=2, start=5_000)]
    verdicts = replay(DetectionEngine(CONFIG), bots + busy + honest, batch=10)
    assert len({verdicts[f"sybil{i}"].entity for i in range(4)}) == 1
    assert verdicts["sybil0"].entity_members == 4
    assert [verdicts[c].entity_members for c in ("busy0", "busy1", "busy2", "early", "late")] == [1] * 5


def test_the_traffic_yardstick_does_not_depend_on_how_events_were_batched() -> None:
    """Lockstep passes happen at fixed queries of the stream; the yardstick they read is
    made from the queries that came before, whether those arrived one by one or in batches
    (several yardsticks: 2,400 rows, four to a request)."""
    rng = random.Random(5)
    stream = sorted(
        (oip_event(f"k{n}", i * 2.0 + n * 0.1, route=OIP, output_margins=[0.8] * 4,
               input_rows=[[rng.gauss(5.0 + n % 3, 1.0) for _ in range(16)] for _ in range(4)])
         for n in range(8) for i in range(75)),
        key=lambda e: e.ts,
    )
    engines = {}
    for batch in (1, 50):
        engine = engines[batch] = DetectionEngine(CONFIG)
        verdicts = replay(engine, stream, batch=batch)
    made = {b: e.traffic._spaces["m:vec16"]._made_at for b, e in engines.items()}
    assert made[1] == made[50] > MIN_ROWS + REMAKE_ROWS
    means = [e.traffic._spaces["m:vec16"]._yardstick.centre for e in engines.values()]
    assert all(np.array_equal(means[0], m) for m in means)
    assert {c: v.entity for c, v in verdicts.items()} == {
        c: engines[1].verdict(c).entity for c in verdicts
    }


def test_keys_idle_for_a_while_are_still_linked_when_they_return_in_lockstep() -> None:
    """A lockstep pass looks only at keys busy in its last ten minutes; keys dropped from
    that set while idle must be looked at again once they are busy."""
    def bots(start: float, spacing: float) -> list[RequestEvent]:
        sweep = perturbation_sweep("script", 80, seed=7)
        return [
            RequestEvent(**{**e.to_dict(), "client": f"sybil{i % 4}", "ip_prefix": f"ip-s{i % 4}",
                            "fingerprint": f"fp-s{i % 4}", "ts": start + i * spacing})
            for i, e in enumerate(sweep)
        ]

    engine = DetectionEngine(CONFIG)
    # An hour of a few queries now and then (no two keys in the same ten seconds), while
    # another client's evaluations run the passes that drop them as idle.
    replay(engine, bots(0.0, 45.0) + natural_vectors("other", 200, seed=3), batch=10)
    assert engine.verdict("sybil0").entity_members == 1
    replay(engine, bots(10_000.0, 1.0) + natural_vectors("busy", 200, seed=4, start=9_000.0),
           batch=10)
    assert engine.verdict("sybil0").entity_members == 4


def test_a_large_entity_is_evaluated_once_per_eight_members_and_flagged_as_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """24 keys on one machine sweeping in turn: the pooled view is evaluated at one member
    evaluation in three, and the entity is flagged at the same query and ends at the same
    level as when every member evaluation evaluates it."""
    sweep = perturbation_sweep("script", 480, seed=7)
    bots = [
        RequestEvent(**{**e.to_dict(), "client": f"bot{i % 24}", "fingerprint": "one-machine",
                        "ts": i * 2.0})
        for i, e in enumerate(sweep)
    ]

    def run(members_per_step: int) -> tuple[int, int | None, Verdict]:
        monkeypatch.setattr(engine_module, "ENTITY_MEMBERS_PER_STEP", members_per_step)
        engine, pooled, flagged = DetectionEngine(CONFIG), 0, None
        evaluate = engine.signals

        def counting(view: Any) -> list[Signal]:
            nonlocal pooled
            pooled += view.state is None  # an entity's view belongs to no one client
            return evaluate(view)

        engine.signals = counting  # type: ignore[method-assign]
        for i, event in enumerate(bots):
            levels = {v.level for v in engine.process([event])}
            if flagged is None and levels - {"normal"}:
                flagged = i
        return pooled, flagged, engine.verdict("bot0")

    (pooled, flagged, verdict), (every, flagged_every, verdict_every) = run(8), run(10**6)
    assert (pooled, every) == (16, 48)
    assert flagged == flagged_every is not None
    assert verdict.entity_members == 24 and verdict.level == verdict_every.level == "block"


def test_an_entity_that_lost_a_member_starts_again_with_one_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The steps a large entity was due were earned by the old group: after a cut, its new
    risk takes one step, however many evaluations the old group had not yet taken."""
    sweep = perturbation_sweep("script", 480, seed=7)
    bots = [
        RequestEvent(**{**e.to_dict(), "client": f"bot{i % 24}", "fingerprint": "one-machine",
                        "ts": i * 2.0})
        for i, e in enumerate(sweep)
    ]
    engine = DetectionEngine(CONFIG)
    events = iter(bots)
    for event in events:  # until the 24-key entity is two member evaluations behind
        engine.process([event])
        entity = engine.entities.get(engine.linker.entity_of("bot0"))
        if entity is not None and len(entity.members) == 24 and entity.due == 2:
            break
    taken: list[int] = []
    update = RiskState.update

    def recording(self: RiskState, signals: list[Signal], now: float, *, steps: int = 1) -> float:
        if all(self is not r for r in engine.risks.values()):  # an entity's, not a client's
            taken.append(steps)
        return update(self, signals, now, steps=steps)

    monkeypatch.setattr(RiskState, "update", recording)
    assert engine.linker.set_cuts([("bot0", "bot1")])
    engine.linker.rebuild(bots[-1].ts)
    for event in events:
        engine.process([event])
        if taken:
            break
    assert taken == [1]


def test_idle_clients_are_forgotten_but_their_risk_is_kept() -> None:
    engine = DetectionEngine(CONFIG)
    replay(engine, harvester("thief", 100, seed=1))
    risk = engine.risks["thief"].risk
    assert risk > 0.5
    # past idle_evict_hours (6); the same network, so the forgotten thief stays in the entity
    later = benign_chat("user", 30, seed=2, start=7 * 3600.0, ip_prefix="ip-thief")
    replay(engine, later)
    assert "thief" not in engine.clients and "user" in engine.clients
    assert engine.risks["thief"].risk == risk  # decays only when the client is next seen


def test_the_listener_sees_every_evaluation_whatever_the_batching() -> None:
    def first_flags(batch: int) -> int | None:
        engine, seen = DetectionEngine(CONFIG), []
        engine.listener = lambda v: seen.append(v.queries) if v.level != "normal" else None
        replay(engine, harvester("thief", 120, seed=1), batch=batch)
        return seen[0] if seen else None

    assert first_flags(1) == first_flags(120) is not None


def test_a_client_evicted_later_in_the_same_batch_has_no_verdict() -> None:
    engine = DetectionEngine(DetectionConfig(evaluate_every=1))
    early = benign_chat("early", 1, seed=1)
    late = benign_chat("late", 1, seed=2, start=7 * 3600.0)
    assert [v.client for v in engine.process(early + late)] == ["late"]


class Always:
    """A detector that always finds ``code`` far beyond its line (a stand-in for any of them)."""

    direction = 1
    default_threshold = 1.0

    def __init__(self, code: str) -> None:
        self.code = code

    def statistic(self, view: object, reference: object) -> float:
        return 10.0

    def describe(self, value: float, threshold: float) -> str:
        return f"{self.code} {value} > {threshold}"


def test_timing_and_volume_alone_tighten_an_established_client_but_never_block_it() -> None:
    habits = DetectionEngine(CONFIG, detectors=[Always("machine_timing"), Always("volume_vs_tier")])
    verdict = replay(habits, benign_chat("stream", 60, seed=5))["stream"]
    assert verdict.risk > 0.9 and verdict.level == "tighten"
    assert {r.code for r in verdict.reasons} == {"machine_timing", "volume_vs_tier"}
    extraction = DetectionEngine(CONFIG, detectors=[Always("machine_timing"), Always("mmd_shift")])
    assert replay(extraction, benign_chat("thief", 60, seed=5))["thief"].level == "block"
    eager = DetectionConfig(evaluate_every=1)
    young = DetectionEngine(eager, detectors=[Always("around_the_clock")])
    assert replay(young, benign_chat("new", 15, seed=5))["new"].level == "block"  # no history yet


class Until(Always):
    """``Always``, for a client's first ``last`` queries only: evidence that stops coming."""

    def __init__(self, code: str, last: int) -> None:
        super().__init__(code)
        self.last = last

    def statistic(self, view: object, reference: object) -> float | None:
        state = getattr(view, "state", None)
        return 10.0 if state is not None and state.total <= self.last else None


def test_unusual_queries_alone_tighten_an_account_with_history_but_block_one_without() -> None:
    unusual = [Always("mmd_shift"), Always("out_of_distribution")]
    for trust, expected in (("standard", "tighten"), ("trusted", "tighten"),
                            ("probation", "block"), ("", "block")):
        engine = DetectionEngine(CONFIG, detectors=unusual)
        verdict = replay(engine, benign_chat("niche", 60, seed=5, trust=trust))["niche"]
        assert verdict.risk > 0.9 and verdict.level == expected, trust
        assert verdict.reasons[0].code in ("mmd_shift", "out_of_distribution")
    demoted = DetectionEngine(CONFIG, detectors=unusual)  # detection put it back on probation
    history = benign_chat("niche", 30, seed=5, trust="standard")
    later = benign_chat("niche", 30, seed=6, start=history[-1].ts + 1, trust="probation")
    assert replay(demoted, history + later)["niche"].level == "tighten"
    extraction = DetectionEngine(CONFIG, detectors=[*unusual, Always("coverage_growth")])
    assert replay(extraction, benign_chat("thief", 60, seed=5, trust="trusted"))["thief"].level == "block"


def test_an_organisations_pooled_unusualness_blocks_none_of_its_members_with_history() -> None:
    engine = DetectionEngine(CONFIG, detectors=[Always("mmd_shift")])
    office = {"ip_prefix": "198.51.100.0/24", "fingerprint": "corporate-proxy", "trust": "standard"}
    staff = [e for i in range(5) for e in benign_chat(f"staff-{i}", 40, seed=i, **office)]
    verdicts = replay(engine, staff)
    assert {v.entity_members for v in verdicts.values()} == {5}
    assert {v.level for v in verdicts.values()} == {"tighten"}


def test_a_member_caught_extracting_convicts_an_entity_already_high_on_unusualness() -> None:
    entity = RiskState(3600.0, without={"habits": frozenset(), "unusual": frozenset({"mmd_shift"})})
    entity.update([Signal("mmd_shift", 1.0, "pooled")], 0.0)
    entity.cusum = entity.partial["habits"] = 5.0  # high on pooled MMD alone
    member = RiskState(3600.0, without=entity.without)
    member.update([Signal("coverage_growth", 1.0, "sweep")], 0.0)
    member.update([Signal("coverage_growth", 1.0, "sweep")], 0.0)
    entity.absorb(member, "habits")
    assert entity.cusum == 5.0  # the total stays the higher one
    assert entity.risk_without("unusual") == member.risk_without("unusual") > 0.8


def test_the_habit_ceiling_holds_after_the_habits_reasons_have_faded() -> None:
    # A busy week, then normal traffic: the reasons fade faster than the score they raised.
    engine = DetectionEngine(CONFIG, detectors=[Until("volume_vs_tier", last=600)])
    verdict = replay(engine, benign_chat("nightly-job", 1000, seed=2))["nightly-job"]
    assert verdict.risk > 0.9 and not verdict.reasons
    assert verdict.level == "tighten"


def test_a_members_habits_are_not_inherited_by_its_entity() -> None:
    engine = DetectionEngine(CONFIG, detectors=[Always("volume_vs_tier")])
    shared = {"ip_prefix": "198.51.100.0/24", "fingerprint": "same-machine"}
    busy = benign_chat("busy", 60, seed=3, **shared)
    newcomer = benign_chat("newcomer", 10, seed=4, start=busy[-1].ts + 100, **shared)
    verdicts = replay(engine, busy + newcomer)
    assert verdicts["busy"].level == "tighten"
    assert verdicts["newcomer"].entity == verdicts["busy"].entity
    assert verdicts["newcomer"].entity_risk == 0.0


def test_a_client_cut_from_its_entity_no_longer_carries_the_entitys_risk() -> None:
    engine = DetectionEngine(CONFIG)
    machine = {"fingerprint": "one-machine", "ip_prefix": "198.51.100.0/24"}
    alice = benign_chat("alice", 10, seed=3, **machine)
    thief = harvester("thief", 120, seed=1, start=alice[-1].ts + 1, **machine)
    verdicts = replay(engine, alice + thief)
    assert verdicts["thief"].level == "block" and verdicts["alice"].entity_members == 2
    engine.linker.set_cuts([("alice", "thief")])
    engine.linker.rebuild(thief[-1].ts)
    later = benign_chat("alice", 10, seed=5, start=thief[-1].ts + 10, fingerprint="own")
    after = replay(engine, later)["alice"]
    assert after.entity_members == 1 and after.level == "normal"


def test_an_entitys_pooled_view_is_its_newest_queries_oldest_first_rows_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pooled: list[list[float]] = []

    class Recording(engine_module.View):
        def __init__(self, queries: Any, *, state: Any = None) -> None:
            super().__init__(queries, state=state)
            if state is None:  # an entity's pooled view
                pooled[:] = [float(q.vector[0]) for q in self.queries]

    monkeypatch.setattr(engine_module, "View", Recording)
    engine = DetectionEngine(DetectionConfig(window=20, evaluate_every=1))
    events = [
        RequestEvent(
            float(t), f"r{t}", client, "key", "default", OIP, "m", 200, account="acct",
            input_rows=[[float(10 * t + row), 0.0] for row in range(3)],
        )
        for t in range(60)
        for client in (f"member{t % 5}",)
    ]
    engine.process(events)
    # Five members of one account, each window the member's newest 20 rows: the view is the
    # newest 80 of those 100, in time order, each request's rows in the order they were sent.
    windows = [
        [10 * t + row for t in range(60) if t % 5 == m for row in range(3)][-20:] for m in range(5)
    ]
    assert pooled == [float(v) for v in sorted(v for w in windows for v in w)][-80:]
