"""Source text marking stage: ask a self-hosted upstream to mark this client's answer.

For an authenticated chat or completions request it adds ``x-modelfence-mark`` to the
gateway's own upstream headers (see :mod:`modelfence.watermark.channel` for what the header
carries and why the model server learns no other client's key). The upstream marks while
sampling; an upstream that does not know the header ignores it and the text stays unmarked.
Upstreams whose answers are marked after the fact (``watermark.lexical``, e.g. a hosted
API) get no header: they could not use it, and would see a per-client token.
"""

from __future__ import annotations

from modelfence.gateway.context import context_of
from modelfence.types import ASGIApp, Receive, Scope, Send
from modelfence.watermark.channel import MARK_HEADER, MarkIssuer


class SourceMarking:
    def __init__(
        self, app: ASGIApp, *, issuer: MarkIssuer, hosted: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.issuer = issuer
        self.hosted = hosted  # upstream names that get no header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        operation = ctx.operation
        text = operation is not None and operation.generates_text
        if ctx.key is not None and text and ctx.upstream not in self.hosted:
            mark = (MARK_HEADER, self.issuer.header(ctx.key.client))
            ctx.upstream_headers = (*ctx.upstream_headers, mark)
        await self.app(scope, receive, send)
