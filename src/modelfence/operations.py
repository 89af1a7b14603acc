"""What an inference request asks for, independent of the path it came in on.

A leaf module (it imports nothing of ModelFence) so the gateway stages, telemetry and
detection can all branch on one :class:`Operation` instead of repeating route strings::

    >>> Operation.for_route("/v1/chat/completions")
    <Operation.CHAT: 'chat'>
    >>> Operation.OIP_INFER.upstream_path("digits?x=1")
    '/v2/models/digits%3Fx%3D1/infer'
"""

from __future__ import annotations

import enum
from urllib.parse import quote


class Operation(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    OIP_INFER = "oip_infer"

    @property
    def route(self) -> str:
        """The route template the gateway serves it on (also the ``route`` metrics label)."""
        return _ROUTES[self]

    @property
    def generates_text(self) -> bool:
        """Chat and completions: answers with text, logprobs, streams."""
        return self in (Operation.CHAT, Operation.COMPLETIONS)

    def upstream_path(self, model: str) -> str:
        """The path to call upstream: the route template, the model name quoted into it.

        Nothing of the client's own path or query string is carried over.
        """
        return _ROUTES[self].replace("{name}", quote(model, safe=""))

    @classmethod
    def for_route(cls, route: str) -> Operation | None:
        return _BY_ROUTE.get(route)


_ROUTES = {
    Operation.CHAT: "/v1/chat/completions",
    Operation.COMPLETIONS: "/v1/completions",
    Operation.EMBEDDINGS: "/v1/embeddings",
    Operation.OIP_INFER: "/v2/models/{name}/infer",
}
_BY_ROUTE = {route: op for op, route in _ROUTES.items()}
