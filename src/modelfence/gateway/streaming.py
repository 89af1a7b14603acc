"""Server-sent events passing through: usage recorded, nothing held back.

The gateway asks streaming upstreams for ``stream_options.include_usage`` so that streams
can be settled to real usage. :class:`SSETap` splits the byte stream into events as they
arrive, records the usage event, and — when the client did not ask for usage itself —
removes what the option added (the final ``choices: []`` event and ``"usage": null`` fields),
so the client sees exactly the stream it asked for. Complete events are forwarded at once;
only a trailing partial event waits for its end. Line ends become LF, ``data:`` fields
``data: `` and a byte-order mark that opens the stream goes (:mod:`.sse`), so every stage
after the proxy reads one framing.
"""

from __future__ import annotations

import orjson

from modelfence.gateway.apis import usage_from_response
from modelfence.gateway.sse import BOM, LineEnds, event_data, spaced

_USAGE = b'"usage"'


class SSETap:
    __slots__ = ("_begun", "_buffer", "_line_ends", "_strip", "content_events", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self._begun = False  # past where a byte-order mark may be
        self._buffer = b""
        self._line_ends = LineEnds()
        self._strip = strip_usage
        self.usage: tuple[int, int] | None = None
        self.content_events = 0  # a fair count of generated tokens if the stream is cut short

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes from upstream; return the bytes to send to the client now."""
        chunk = self._line_ends(chunk)
        data = self._buffer + chunk if self._buffer else chunk
        if not self._begun:
            if len(data) < len(BOM) and BOM.startswith(data):
                self._buffer = data  # the stream so far could be a mark cut short: wait
                return b""
            self._begun = True
            data = data.removeprefix(BOM)
        complete, sep, rest = data.rpartition(b"\n\n")
        if not sep:
            self._buffer = data
            return b""
        self._buffer = rest
        complete = spaced(complete)
        if _USAGE not in complete:
            self.content_events += complete.count(b"data: {")
            return complete + sep
        return b"".join(self._event(event) for event in (complete + sep).split(b"\n\n") if event)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return spaced(rest)

    def _event(self, event: bytes) -> bytes:
        found = event_data(event)
        is_json = found is not None and found[1].lstrip().startswith(b"{")
        if _USAGE not in event or not is_json:
            self.content_events += is_json
            return event + b"\n\n"
        assert found is not None
        others, data = found
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        usage = usage_from_response(payload)
        if usage is not None:
            self.usage = usage
        if not self._strip:
            self.content_events += bool(payload.get("choices"))
            return event + b"\n\n"
        if usage is not None and not payload.get("choices"):
            return b""  # the usage-only event the client did not ask for
        self.content_events += 1
        payload.pop("usage", None)
        try:
            return others + b"data: " + orjson.dumps(payload) + b"\n\n"
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: kept as it came
            return event + b"\n\n"
