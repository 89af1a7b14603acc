"""The console's client list with 10,000 scored clients: server time per page (≤ 300 ms).

A real ``modelfence serve`` on a fresh SQLite store (or ``--store`` PostgreSQL) seeded with
``--clients`` published verdicts (mixed tiers, levels and reasons; entities of 7 members,
and one of ``--big-entity`` members linked in a chain) and 1,000 keys in 100 accounts; one
logged-in console session asks for the list page in the ways an analyst does (riskiest
first, the last page, sorted by level, filtered by reason, by account, by part of a name),
then for the campaign list and the campaign view of a small and of the big entity. The time is the ``Server-Timing`` the console sends: from the request
reaching the console to the response being ready (queries and rendering), so the network
and the client are left out. p50 and p99 per way; PASS when every p99 is ≤ 300 ms.

    python bench/console_clients.py                     # 10,000 clients, 100 pages each way
    python bench/console_clients.py --clients 50000 --runs 200
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import re
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from modelfence.detect.state import ClientRecord, SqlState
from modelfence.identity import SqlKeyStore, load_server_secret
from modelfence.store import create_tables, open_engine
from modelfence.testing.processes import GatewayProcess

TARGET_MS = 300.0
TOKEN = "bench-admin-token-0123456789"
SECRET = "bench-secret-0123456789abcdef"
REASONS = ["llm_harvesting", "machine_timing", "coverage_growth", "volume_vs_tier", "mmd_shift"]
LEVELS = ["normal"] * 12 + ["alert", "tighten", "degrade", "block"]
WAYS: dict[str, tuple[str, dict[str, Any]]] = {
    "riskiest first": ("/clients", {}),
    "last page": ("/clients", {"page": 200}),
    "sorted by level": ("/clients", {"sort": "level", "order": "desc"}),
    "reason filter": ("/clients", {"reason": "machine_timing"}),
    "account filter": ("/clients", {"account": "acct-042"}),
    "name search": ("/clients", {"q": "client-01"}),
    "campaign list": ("/campaigns", {}),
    "campaign, 7": ("/campaign", {"entity": "ent_0042"}),
    "campaign, big": ("/campaign", {"entity": "ent_big"}),
}


async def seed(store: str, clients: int, big: int) -> None:
    engine = open_engine(store)
    await create_tables(engine)
    rng = random.Random(2026)
    now = datetime.now(UTC)
    records = []
    for i in range(clients):
        reasons = [{"code": code, "text": f"statistic {rng.random():.2f} past its threshold",
                    "score": round(rng.random(), 2)} for code in rng.sample(REASONS, rng.randint(0, 3))]
        records.append(ClientRecord(
            client=f"client-{i:05}", tier=rng.choice(["default", "pro"]),
            entity="ent_big" if i >= clients - big else f"ent_{i // 7:04}", risk=rng.random(), level=rng.choice(LEVELS),  # type: ignore[arg-type]
            quota_share=1.0, reasons=reasons, queries=rng.randint(1, 5000), shadow=False,
            updated_at=now, links=[{"other": f"client-{(i + 1) % clients:05}",
                                    "kinds": ["ip_prefix"], "weight": 0.6, "joins": True,
                                    "cut": False}],
        ))
    state = SqlState(engine)
    for start in range(0, clients, 1000):
        await state.publish(records[start : start + 1000])
    keys = SqlKeyStore(engine, load_server_secret(SECRET, "unused.secret"))
    for i in range(min(clients, 1000)):
        await keys.create(f"client-{i * (clients // 1000 or 1):05}", "default", f"acct-{i % 100:03}")
    await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100, help="pages timed per way")
    parser.add_argument("--big-entity", type=int, default=2_000, help="members of the big entity")
    parser.add_argument("--store", help="a PostgreSQL URL (an empty database); default SQLite")
    args = parser.parse_args()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("command: python " + " ".join(sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        store = args.store or f"sqlite:///{workdir / 'state.db'}"
        asyncio.run(seed(store, args.clients, args.big_entity))
        config = {
            "upstreams": [{"name": "none", "url": "http://127.0.0.1:9", "kind": "openai",
                           "models": ["*"]}],
            "store": store, "secret": SECRET, "admin_token": TOKEN,
            "limits": {"tiers": {"default": {}, "pro": {}}},
            "detection": {"enabled": False},
        }
        with GatewayProcess(config, workdir) as gateway:
            print(f"store: {store.split(':')[0]}, {args.clients} clients (one entity of "
                  f"{args.big_entity}), {args.runs} pages per way")
            return run(gateway, args.runs)


def run(gateway: GatewayProcess, runs: int) -> int:
    failed = False
    with httpx.Client(base_url=gateway.url + "/console", timeout=30) as http:
        assert http.post("/login", data={"token": TOKEN}).status_code == 303
        for way, (path, params) in WAYS.items():
            server, rows = [], 0
            for i in range(runs + 5):
                response = http.get(path, params=params)
                response.raise_for_status()
                match = re.search(r"dur=([\d.]+)", response.headers["server-timing"])
                assert match is not None
                if i >= 5:  # warm-up
                    server.append(float(match.group(1)))
                rows = response.text.count('href="/console/client?name=')
            p50, p99 = np.percentile(server, 50), np.percentile(server, 99)
            verdict = "PASS" if p99 <= TARGET_MS else "FAIL"
            failed |= verdict == "FAIL"
            print(f"{way:16} {rows:3} rows   server p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   "
                  f"{verdict} (p99 ≤ {TARGET_MS:.0f} ms)")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
