"""The detector's own metrics: a ``modelfence detect`` worker's ``/metrics``, and the
in-gateway detector's metrics on the gateway's ``/metrics``."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.config import parse_config
from modelfence.detect.feeds import RedisStreamSink
from modelfence.errors import ConfigError
from modelfence.store import open_engine
from modelfence.store.schema import request_events
from modelfence.testing.processes import (
    ServiceProcess,
    free_port,
    http_json,
    modelfence_command,
    write_config,
)

from .conftest import GatewayFactory
from .services import metric_sum, private_redis, scrape_metrics
from .test_detect_streams import harvester

PARTITIONS = 4
AGE = 20.0  # seconds: how old the events already are when written to the streams
LAG = "modelfence_detector_lag_seconds"
STORED = "modelfence_detector_stored_events_total"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_for(
    url: str, name: str, at_least: float, timeout: float = 60.0, **labels: str
) -> Samples:
    """Scrape ``url`` until sample ``name`` (its series with ``labels``) reaches
    ``at_least``; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape_metrics(url)
        if metric_sum(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


async def test_a_detect_worker_serves_its_lag_on_metrics(tmp_path: Path) -> None:
    port = free_port()
    with private_redis() as (url, redis_proc):
        config = {
            "store": f"sqlite:///{tmp_path / 'state.db'}",
            "detection": {
                "feed": "redis",
                "redis_url": url,
                "partitions": PARTITIONS,
                "embedder": "hashing",
                "metrics_port": port,
                "metrics_host": "127.0.0.1",
            },
        }
        path = write_config(tmp_path / "detect.yaml", config)
        worker = ServiceProcess(
            modelfence_command("--config", str(path), "detect"),
            port=port,
            ready_path="/metrics",
            log_file=tmp_path / "detect.log",
        )
        with worker:
            before = scrape_metrics(worker.url)
            assert metric_sum(before, LAG + "_count") == 0
            assert metric_sum(before, "modelfence_detector_events_total") == 0

            clients = ["thief-a", "thief-b", "<img src=x>"]
            now = time.time()
            events = [
                e
                for i, client in enumerate(clients)
                for e in harvester(client, 20, seed=i, start=now - AGE, gap=0.01)
            ]
            redis = Redis.from_url(url)
            try:
                written_at = time.time()
                await RedisStreamSink(redis, PARTITIONS).write(events)
            finally:
                await redis.aclose()
            samples = wait_for(worker.url, LAG + "_count", len(events))
            seen_within = time.time() - written_at

            n = len(events)
            assert metric_sum(samples, LAG + "_count") == n
            assert metric_sum(samples, "modelfence_detector_events_total") == n
            # Each event was AGE seconds old (less its offset) when written, and its verdict
            # was out before the scrape that saw it.
            ages = sum(written_at - e.ts for e in events)
            lag_sum = metric_sum(samples, LAG + "_sum")
            assert ages <= lag_sum <= ages + n * seen_within, (ages, lag_sum, seen_within)
            assert metric_sum(samples, LAG + "_bucket", le="10.0") == 0
            assert metric_sum(samples, LAG + "_bucket", le="+Inf") == n
            # A batch's duration is observed after its audits and alerts, a moment after its
            # events' lag: a scrape may fall between the two.
            samples = wait_for(worker.url, "modelfence_detector_batch_duration_seconds_count", 1)
            assert metric_sum(samples, "modelfence_detector_batch_duration_seconds_count") >= 1
            assert metric_sum(samples, "modelfence_detector_verdicts_published_total") >= len(
                clients
            )
            assert metric_sum(samples, "modelfence_detector_errors_total") == 0
            # The worker writes the events it read to request_events: the gateways do not.
            # They are counted as emitted when read and as written after their batch's
            # insert: wait for the second.
            samples = wait_for(worker.url, STORED, n, fate="written")
            assert metric_sum(samples, STORED, fate="written") == n
            assert metric_sum(samples, STORED) == 2 * n  # emitted, then written
            assert await stored_events(config["store"]) == n
            # Labels are bounded: no client ever names a series.
            _status, text = http_json("GET", worker.url + "/metrics")
            assert "thief" not in text and "img" not in text

            redis_proc.kill()  # the feed goes away: its failures are counted, by stage
            redis_proc.wait(10)
            samples = wait_for(worker.url, "modelfence_detector_errors_total", 1, timeout=30)
            assert metric_sum(samples, "modelfence_detector_errors_total", stage="feed") >= 1
            assert metric_sum(samples, "modelfence_detector_errors_total", stage="store") == 0


def test_in_gateway_detection_reports_on_the_gateway_metrics(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(
        detection={"enabled": True, "feed": "process", "embedder": "hashing", "shadow": True}
    )
    key = gateway.create_key("metered")
    requests = 12
    started = time.time()
    for i in range(requests):
        status, _ = http_json(
            "POST",
            gateway.url + "/v1/chat/completions",
            {"model": "fake-chat", "messages": [{"role": "user", "content": f"hello {i}"}]},
            token=key,
        )
        assert status == 200
    samples = wait_for(gateway.url, LAG + "_count", requests, timeout=30)
    took = time.time() - started
    assert metric_sum(samples, LAG + "_count") == requests
    assert metric_sum(samples, "modelfence_detector_events_total") == requests
    # Fresh events: none waited longer than the requests and the scrapes took.
    assert 0 < metric_sum(samples, LAG + "_sum") <= requests * took
    assert metric_sum(samples, "modelfence_detector_verdicts_published_total") >= 1
    # The gateway's own metrics are still there beside them.
    chat = {"route": "/v1/chat/completions", "outcome": "ok"}
    assert metric_sum(samples, "modelfence_requests_total", **chat) == requests
    # Events leave the gateway through the detector's queue alone (one sink, no database
    # write in the gateway); the detector child writes them to request_events.
    samples = wait_for(gateway.url, STORED, 2 * requests, timeout=30)
    assert metric_sum(samples, STORED, fate="written") == requests
    assert metric_sum(samples, "modelfence_telemetry_events_total", fate="written") == requests
    assert asyncio.run(stored_events(gateway.config["store"])) == requests


async def stored_events(store: str) -> int:
    engine = open_engine(store)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(request_events)))
                       .scalar_one())
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("value", "message"),
    [(70000, "less than or equal to 65535"), (0, "greater than or equal to 1"),
     ("web", "valid integer")],
)
def test_a_bad_metrics_port_is_refused_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"detection": {"feed": "redis", "metrics_port": value}})
    assert "detection.metrics_port" in str(err.value) and message in str(err.value)


def test_a_detect_worker_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "detect.yaml",
            {
                "store": f"sqlite:///{tmp_path / 'state.db'}",
                "detection": {"feed": "redis", "redis_url": "redis://127.0.0.1:1/0",
                              "metrics_port": port, "metrics_host": "127.0.0.1"},
            },
        )
        result = CliRunner().invoke(app, ["--config", str(config), "detect"])
    assert result.exit_code == 2, result.output
    assert "detection.metrics_port" in result.output and str(port) in result.output
