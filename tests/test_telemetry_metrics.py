"""What grows with client-chosen names stays bounded: metric labels, per-model state."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.watermark import MAX_MODELS_SEEN, OutputWatermark, _Plan
from modelfence.identity.secret import ServerSecret
from modelfence.telemetry.metrics import OTHER, SPARE_LABEL_VALUES, LabelCap, Metrics
from modelfence.types import Receive, Scope, Send
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring


def label_values(metrics: Metrics, family: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for metrics_family in text_string_to_metric_families(metrics.render().decode())
        if metrics_family.name == family
        for sample in metrics_family.samples
        if label in sample.labels
    }


def test_client_chosen_model_names_do_not_grow_the_exposition() -> None:
    metrics = Metrics()
    for i in range(5000):
        outcome = "ok" if i % 2 else "rate_limited"  # denied requests name models too
        metrics.observe_request("/v1/chat/completions", f"model-{i}", "default", outcome, 0.01)
        metrics.upstream_error("demo", f"status_{i}")
        metrics.unmarked_row(f"digits-{i}")
    models = label_values(metrics, "modelfence_requests", "model")
    assert len(models) <= SPARE_LABEL_VALUES + 1 and OTHER in models
    denied = {f"model-{i}" for i in range(0, 5000, 2)}
    assert not models & denied  # only models that were served are learnt
    assert len(label_values(metrics, "modelfence_upstream_errors", "kind")) <= SPARE_LABEL_VALUES + 1
    assert len(label_values(metrics, "modelfence_watermark_unmarked_rows", "model")) <= SPARE_LABEL_VALUES + 1
    assert len(metrics.render()) < 200_000
    assert len(metrics._children) < 4 * (SPARE_LABEL_VALUES + 2)  # the cache is bounded too


def test_configured_models_are_labelled_even_before_they_are_served() -> None:
    metrics = Metrics(models=["gpt-4o", "digits"])
    metrics.observe_request("/v1/chat/completions", "gpt-4o", "default", "rate_limited", 0.01)
    metrics.observe_request("/v1/chat/completions", "made-up", "default", "rate_limited", 0.01)
    metrics.observe_request("/v1/chat/completions", "x" * 500, "default", "ok", 0.01)
    assert label_values(metrics, "modelfence_requests", "model") == {"gpt-4o", OTHER}


def test_a_label_cap_keeps_known_values_and_the_first_others() -> None:
    tiers = LabelCap({"default"}, spare=1)
    assert [tiers(t) for t in ("default", "gold", "x", "gold")] == ["default", "gold", OTHER, "gold"]
    served = LabelCap(learn=False)
    assert served("m") == OTHER
    served.learn("m")
    assert served("m") == "m"


async def test_class_counts_are_remembered_for_a_bounded_number_of_models() -> None:
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    ring = WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef"))
    stage = OutputWatermark(endpoint, config=WatermarkConfig(), keyring=ring, ledger=None)
    plan = _Plan(ring.key("acme"), rows=np.zeros((1, 2)))
    answer = {"outputs": [{"name": "p", "datatype": "FP32", "shape": [1, 3], "data": [0.2, 0.5, 0.3]}]}
    for i in range(MAX_MODELS_SEEN + 100):
        ctx = RequestContext(route="/v2/models/{name}/infer", started=0.0, request_id="r",
                             path_model=f"model-{i}")
        transform = await stage.transform_for({"type": "http", SCOPE_KEY: ctx}, plan, 200)
        assert transform is not None
        transform(answer)
    assert len(stage.classes_seen) == MAX_MODELS_SEEN
