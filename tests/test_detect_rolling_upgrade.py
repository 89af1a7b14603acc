"""Published state across releases and across the detector's refresh interval: a reader
ignores keys a newer release added (Redis actions, stored reasons), an older reader still
reads what this release writes, and a verdict computed from pins read before an
operator's new pin does not undo that pin."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from modelfence.config import DetectionConfig
from modelfence.detect.actions import Action, Policy
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.state import ACTIONS_KEY, RedisState, SqlState
from modelfence.store import create_tables

from .test_console_pages import record
from .test_detect_service import service
from .test_detect_streams import benign_chat, harvester
from .test_store_database import scratch_engine


@dataclass(frozen=True, slots=True)
class OlderAction:
    """The action as a replica of the release before ``probation`` reads it."""

    level: str
    quota_share: float = 1.0


@pytest.mark.redis
async def test_shared_actions_read_across_releases(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:8]
    newer, blocked, held = f"newer-{tag}", f"blocked-{tag}", f"held-{tag}"
    shared = RedisState(redis)
    try:
        # A newer release's record: its unknown key is ignored, the snapshot still reads.
        future = {"level": "tighten", "quota_share": 0.5, "probation": True, "weight": 3}
        await redis.hset(ACTIONS_KEY, newer, orjson.dumps(future))
        await shared.publish([record(blocked, 0.9, level="block", quota_share=0.25),
                              record(held, 0.1, probation=True)])
        actions = await shared.actions()
        assert actions[newer] == Action("tighten", 0.5, probation=True)
        assert actions[blocked] == Action("block", 0.25)

        # What this release writes, read as the release before reads it.
        raw = await redis.hmget(ACTIONS_KEY, [blocked, held])
        assert OlderAction(**orjson.loads(raw[0])) == OlderAction("block", 0.25)
        assert orjson.loads(raw[1]) == {"level": "normal", "quota_share": 1.0, "probation": True}
    finally:
        await redis.hdel(ACTIONS_KEY, newer, blocked, held)
        await redis.aclose()


async def test_stored_reasons_with_keys_of_a_newer_release_are_resumed(tmp_path: Path) -> None:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        reasons = [{"code": "timing", "text": "a metronome", "score": 0.7, "value": 0.01,
                    "threshold": 0.1, "since": 5.0, "source_query": "q-17"},
                   {"code": "coverage", "text": "wide", "score": 0.4}]  # older: fewer keys
        await SqlState(engine).publish([record("thief", 0.6, level="alert", reasons=reasons)])
        detector = service(engine, [])
        await detector.handle(harvester("thief", 5, seed=1))  # seeds thief from its record
        thief = await SqlState(engine).get("thief")
        assert thief is not None and thief.risk >= 0.6


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


async def test_a_pin_set_after_the_detector_read_the_pins_is_not_undone(
    state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfence.detect.service.OVERRIDE_REFRESH_SECONDS", 3600.0)
    async with scratch_engine(state_url) as engine:
        await create_tables(engine)
        state = SqlState(engine)
        operator = OperatorActions(state, Policy(DetectionConfig()))
        detector = service(engine, [])
        await detector.handle(benign_chat("walker", 10, seed=3))  # pins read: none
        await operator.pin("thief", "shadow", "watch")
        await operator.pin("held", "probation", "hold")

        published: dict[str, Any] = {}
        events = sorted(harvester("thief", 100, seed=1) + harvester("held", 20, seed=2),
                        key=lambda e: e.ts)
        for i in range(0, len(events), 20):
            published |= {r.client: r for r in await detector.handle(events[i : i + 20])}
        thief, held = await state.get("thief"), await state.get("held")
        assert thief is not None and thief.level == "block" and thief.shadow
        assert held is not None and held.probation and not held.shadow
        assert published["thief"].shadow and published["held"].probation  # as stored
        actions = await state.actions()
        assert "thief" not in actions and actions["held"].probation
