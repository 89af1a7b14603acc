"""What reading server-sent events costs every stream: the proxy's tap and one rewriting stage.

Every streamed answer goes through the proxy's ``SSETap`` (usage recorded, line ends and
``data:`` fields made one framing); a stream that a stage rewrites (hardening, marks) also
goes through an ``SSERewriter``. This times both on a stream of ``--events`` chat deltas in
``--chunk``-byte reads, canonical framing (``data: {...}`` and LF, as vLLM and OpenAI send
it), CPU µs per event, the median of 9 rounds. Compare two trees side by side with
``PYTHONPATH=<other checkout>/src python bench/sse_tap.py``.

    python bench/sse_tap.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import orjson

import modelfence
from modelfence.gateway.rewrite import SSERewriter
from modelfence.gateway.streaming import SSETap


def stream(events: int) -> bytes:
    return b"".join(b"data: " + orjson.dumps({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}],
        "usage": None}) + b"\n\n" for i in range(events)) + b"data: [DONE]\n\n"


def per_event_us(run: Callable[[], None], events: int, rounds: int = 9) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(20):
            run()
        times.append((time.thread_time() - started) / 20 / events * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=512, help="bytes per read from upstream")
    args = parser.parse_args()
    body = stream(args.events)
    chunks = [body[i : i + args.chunk] for i in range(0, len(body), args.chunk)]

    def tap() -> None:
        reader = SSETap(strip_usage=True)
        for chunk in chunks:
            reader.feed(chunk)
        reader.flush()

    def rewrite() -> None:
        rewriter = SSERewriter(lambda payload: payload)
        for i, chunk in enumerate(chunks):
            rewriter.feed(chunk, i < len(chunks) - 1)

    print(f"modelfence from {modelfence.__file__}; {args.events} events, {len(body)} bytes "
          f"in {len(chunks)} reads")
    print(f"proxy tap (SSETap):        {per_event_us(tap, args.events):.2f} CPU µs per event")
    print(f"one rewriting stage:       {per_event_us(rewrite, args.events):.2f} CPU µs per event")


if __name__ == "__main__":
    main()
