"""What does a flood of made-up API keys cost a replica, with and without the key index?

One event loop, as in a gateway: a ``KeyRegistry`` on a real store (a fresh SQLite file,
or ``--store``) holding ``--keys`` issued keys. For ``--seconds``, a flood task
authenticates a new well-formed made-up key ``--flood`` times a second (as a guesser
spread over many addresses sends them: the per-address failure limit never applies), and
an honest task authenticates a known key 200 times a second. Measured per mode:

- store lookups the flood caused, and made-up keys refused without one;
- CPU seconds of this process per second (the flood's cost to the loop);
- the honest task's delay p50/p99: from when each of its requests was due to when its
  authentication returned (what the flood adds to an honest request's latency).

Modes: ``no flood`` (the honest task alone), ``no index`` (the registry before its first
poll: every made-up key is looked up, as before the key index existed) and ``index``
(after a poll built it; 50 lookups a second for keys in no index). Last, how long a key
index of a million keys takes to build (what a replica's first poll costs its loop).

    python bench/key_flood.py                        # 10,000 keys, 1,000 made-up keys/s, 10 s
    python bench/key_flood.py --seconds 3 --keys 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from overhead import machine  # bench/overhead.py: the shared machine description
from sqlalchemy import insert

from modelfence.errors import KeyLookupDeferred
from modelfence.identity import ApiKeyRecord, KeyRegistry, ServerSecret, SqlKeyStore, new_api_key
from modelfence.identity.key_index import KeyIndex
from modelfence.store import create_tables, open_engine, transaction
from modelfence.store.schema import api_keys

HONEST_RATE = 200.0
SECRET = ServerSecret(b"key-flood-bench-secret-0123456789")


async def issue(store: SqlKeyStore, url: str, n: int) -> str:
    """``n`` issued keys (one through the store, the rest inserted in one statement like
    it); returns the secret of the first."""
    _record, api_key = await store.create("honest", "default")
    now = datetime.now(UTC)
    rows = [
        {"key_id": f"key_bench_{i}", "client": f"c{i}", "tier": "default",
         "prefix": "mf_bench", "key_hash": SECRET.hash_api_key(new_api_key()),
         "created_at": now, "updated_at": now, "overrides": {}}
        for i in range(n - 1)
    ]
    engine = open_engine(url)
    try:
        async with transaction(engine) as conn:
            await conn.execute(insert(api_keys), rows)
    finally:
        await engine.dispose()
    return api_key


async def made_up(registry: KeyRegistry) -> None:
    """One made-up key: unknown (401 at a gateway) or not looked up (503, counted)."""
    with contextlib.suppress(KeyLookupDeferred):
        assert await registry.authenticate(new_api_key()) is None


async def run(registry: KeyRegistry, honest_key: str, flood_rate: float, seconds: float,
              store: CountingStore, refused: list[int]) -> dict[str, float]:
    delays: list[float] = []
    start = time.monotonic()
    cpu = time.process_time()

    async def honest() -> None:
        for n in range(int(HONEST_RATE * seconds)):
            due = start + n / HONEST_RATE
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            assert await registry.authenticate(honest_key) is not None
            delays.append(time.monotonic() - due)

    async def flood() -> None:
        pending: set[asyncio.Task[object]] = set()
        for n in range(int(flood_rate * seconds)):
            due = start + n / flood_rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(made_up(registry))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    before, refused_before = store.lookups, refused[0]
    await asyncio.gather(honest(), flood())
    wall = time.monotonic() - start
    return {
        "lookups": store.lookups - before,
        "refused": refused[0] - refused_before,
        "cpu_per_s": (time.process_time() - cpu) / wall,
        "p50_ms": 1e3 * float(np.percentile(delays, 50)),
        "p99_ms": 1e3 * float(np.percentile(delays, 99)),
        "wall": wall,
    }


class CountingStore(SqlKeyStore):
    """The real store, counting its lookups by secret: what the flood costs the database."""

    lookups = 0

    async def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        self.lookups += 1
        return await super().find_by_secret(secret)


async def main_async(args: argparse.Namespace, url: str) -> None:
    engine = open_engine(url)
    await create_tables(engine)
    store = CountingStore(engine, SECRET)
    honest_key = await issue(store, url, args.keys)
    print(f"store: {url.split(':')[0]}, {args.keys:,} issued keys; flood {args.flood:,.0f} "
          f"made-up keys/s, honest {HONEST_RATE:.0f} req/s, {args.seconds:g} s per mode")
    print("| mode | store lookups by the flood | refused without a lookup | CPU s per s | "
          "honest delay p50 | honest delay p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    refused = [0]
    warm = KeyRegistry(store, SECRET)  # the first second of a loop is slower: not measured
    await warm.authenticate(honest_key)
    await run(warm, honest_key, 0.0, 1.0, store, refused)
    for mode in ("no flood", "no index", "index"):
        registry = KeyRegistry(
            store, SECRET, on_lookup_refused=lambda: refused.__setitem__(0, refused[0] + 1)
        )
        await registry.authenticate(honest_key)  # cached, as a busy customer's key is
        if mode == "index":
            started = time.perf_counter()
            await registry.refresh()
            print(f"(index of {args.keys:,} keys built in {time.perf_counter() - started:.3f} s)")
        flood = 0.0 if mode == "no flood" else args.flood
        r = await run(registry, honest_key, flood, args.seconds, store, refused)
        print(f"| {mode} | {r['lookups']:,} ({r['lookups'] / r['wall']:,.0f}/s) | "
              f"{r['refused']:,} | {r['cpu_per_s']:.2f} | {r['p50_ms']:.2f} ms | "
              f"{r['p99_ms']:.2f} ms |")
    await engine.dispose()
    million = [secrets.token_hex(32) for _ in range(1_000_000)]
    started = time.perf_counter()
    KeyIndex.of(million)
    print(f"(a key index of 1,000,000 keys builds in {time.perf_counter() - started:.2f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000, help="issued keys in the store")
    parser.add_argument("--flood", type=float, default=1_000.0, help="made-up keys per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each mode")
    parser.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file)")
    args = parser.parse_args(argv)
    m = machine()
    print(f"# Key flood — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print("command: python bench/key_flood.py" + "".join(f" {a}" for a in (argv or [])))
    if args.store:
        asyncio.run(main_async(args, args.store))
        return 0
    with tempfile.TemporaryDirectory(prefix="modelfence-key-flood-") as tmp:
        asyncio.run(main_async(args, f"sqlite:///{Path(tmp) / 'keys.db'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
