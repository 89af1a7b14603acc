"""The gateway serves with one BLAS thread: its numpy work is small matrices on the event
loop, and a multi-threaded BLAS on a busy machine spins waiting for its threads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import uvicorn
from threadpoolctl import threadpool_info, threadpool_limits

from modelfence.config import ServerConfig
from modelfence.gateway.server import run_gateway


def test_run_gateway_limits_blas_to_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    assert np.ones((2, 2)) @ np.ones(2) is not None  # numpy's BLAS is loaded
    seen: list[int] = []

    def serve(server: uvicorn.Server, *_: Any) -> None:  # what the server runs, limits then
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    with threadpool_limits(2, user_api="blas"):  # as on a 2-core machine; restored after
        run_gateway(object(), ServerConfig(), on_close=lambda _: None, host="127.0.0.1",  # type: ignore[arg-type]
                    port=0, log_level="info")
    assert seen and set(seen) == {1}
