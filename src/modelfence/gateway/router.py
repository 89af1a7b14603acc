"""Path dispatch: exact routes, the OIP model routes, and the admin mount.

Sets ``ctx.route`` to the route *template* (a bounded metrics label) before anything else
runs, and answers unknown paths (404) and methods (405, with ``Allow``) itself so nothing
unknown reaches an upstream.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelfence.errors import GatewayError, NotFound
from modelfence.gateway.context import context_of
from modelfence.types import ASGIApp, Receive, Scope, Send

Routes = Mapping[tuple[str, str], ASGIApp]  # (method, route template) -> app


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


def _oip_template(path: str) -> tuple[str, str] | None:
    """("/v2/models/{name}/infer", name) for OIP model paths, else None."""
    parts = path.split("/")
    # "", "v2", "models", name[, "infer" | "ready"]
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
        return None
    if len(parts) == 4:
        return "/v2/models/{name}", parts[3]
    if len(parts) == 5 and parts[4] in ("infer", "ready"):
        return "/v2/models/{name}/" + parts[4], parts[3]
    return None


class Router:
    def __init__(self, routes: Routes, *, mounts: Mapping[str, ASGIApp]) -> None:
        self.routes = dict(routes)
        # template -> the Allow header of its 405s
        self.allowed: dict[str, bytes] = {
            template: ", ".join(sorted(m for m, t in routes if t == template)).encode()
            for _, template in routes
        }
        self.mounts = dict(mounts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        for prefix, app in self.mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                context_of(scope).route = prefix
                await app({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)
                return
        ctx = context_of(scope)
        template = path
        if template not in self.allowed:
            oip = _oip_template(path)
            if oip is None or oip[0] not in self.allowed:
                raise NotFound(f"unknown route {path}", code="unknown_route")
            template, ctx.path_model = oip
        ctx.route = template
        endpoint = self.routes.get((scope["method"], template))
        if endpoint is None:
            allowed = self.allowed[template]
            raise MethodNotAllowed(
                f"{scope['method']} is not allowed on {template}; allowed: {allowed.decode()}",
                headers=[(b"allow", allowed)],
            )
        await endpoint(scope, receive, send)
