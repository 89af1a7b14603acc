"""Server-sent event framing, read as the WHATWG spec reads it, in one place.

Most upstreams write ``data: {...}\\n\\n``; the spec also allows CRLF or CR line ends,
``data:{...}`` (the space after the colon is optional), field lines such as ``event:`` or
``id:`` before the data, and data split over several ``data:`` lines. A stage that only
knew the common form would pass the others through unread: unhardened, unmarked,
unsettled; so would a stream that opens with a byte-order mark, which the spec ignores.
:class:`LineEnds` turns every line end into LF as the bytes arrive (the proxy does it once,
for every stage after it, and drops the mark: :class:`~.streaming.SSETap`), and
:func:`event_data` reads an event's data.
"""

from __future__ import annotations

import re

_FIELD_WITHOUT_SPACE = re.compile(rb"^data:(?! )", re.MULTILINE)
BOM = "\ufeff".encode()  # one may open a stream; readers ignore it


class LineEnds:
    """CRLF and CR line ends as LF, across chunk boundaries (a CR ending one chunk and an
    LF starting the next are one line end)."""

    __slots__ = ("_after_cr",)

    def __init__(self) -> None:
        self._after_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk  # an empty chunk between a CR and its LF changes nothing
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return chunk


def spaced(events: bytes) -> bytes:
    """``events`` (LF line ends) with every ``data:`` field written ``data: `` (the same
    value to any reader: the spec drops one leading space)."""
    if events.count(b"data:") == events.count(b"data: "):
        return events
    return _FIELD_WITHOUT_SPACE.sub(b"data: ", events)


def event_data(event: bytes) -> tuple[bytes, bytes] | None:
    """An event's other lines (each ending in LF) and its data: the values of its
    ``data: `` lines joined by LF, as the spec reads them. None: the event has no data.
    ``event`` has LF line ends and ``data: `` fields (:class:`LineEnds`, :func:`spaced`)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return b"", event[6:]  # the common case: one data line alone
    lines = event.split(b"\n")
    values = [line[6:] for line in lines if line.startswith(b"data: ")]
    if not values:
        return None
    others = b"".join(line + b"\n" for line in lines if not line.startswith(b"data: "))
    return others, b"\n".join(values)
