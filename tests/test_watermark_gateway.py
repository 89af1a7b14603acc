"""The watermark stage end to end: ``modelfence serve`` on the fake upstream."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from modelfence.identity.secret import ServerSecret
from modelfence.testing.processes import http_json
from modelfence.watermark.embeddings import candidate_words, embedding_mark
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.labels import label_mark

from .conftest import GatewayFactory
from .services import metric_sum, scrape_metrics
from .test_policy_gateway import post

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

RING = WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef"))  # base_config's secret
ROWS = np.array([(i // 60, i % 60) for i in range(3000)], dtype=float)  # distinct rows
PROBS = [0.05, 0.7, 0.1, 0.15]


def infer(rows: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.ravel().tolist()}], "fake_probabilities": PROBS}


def _ledger(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT client, digest, label FROM watermark_ledger").fetchall()


def test_labels_marked_per_client_deterministically_and_recorded(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = start_gateway()
    key = gateway.create_key("wm-acme")
    status, body = post(gateway.url, "/v2/models/digits-fake/infer", key, infer(ROWS))
    assert status == 200
    data = orjson.loads(body)["outputs"][0]["data"]
    wanted = [label_mark(RING.key("wm-acme"), r, rate=0.005, quantum=0.5) for r in ROWS]
    marked = [i for i, m in enumerate(wanted) if m.marked]
    assert marked
    for i in range(len(ROWS)):
        row = data[i * 4 : (i + 1) * 4]
        assert sorted(row) == sorted(PROBS)
        top = max(range(4), key=row.__getitem__)
        assert top == (wanted[i].label(1, 4) if i in marked else 1)
    assert orjson.loads(post(gateway.url, "/v2/models/digits-fake/infer", key, infer(ROWS))[1]) \
        == orjson.loads(body)
    for _ in range(50):
        recorded = _ledger(tmp_path / "state.db")
        if len(recorded) == len(marked):
            break
        time.sleep(0.1)
    assert sorted(d for _c, d, _l in recorded) == sorted(wanted[i].digest.hex() for i in marked)
    assert RING.key("wm-acme").material.hex() not in body.decode()


def test_embeddings_marked_only_for_trigger_texts(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(watermark={"labels": {"enabled": False}})
    key = gateway.create_key("wm-emb")
    mark = embedding_mark(RING.key("wm-emb"), 8, candidate_words())
    trigger = next(iter(mark.triggers))
    texts = ["the weather is nice", f"a {trigger} walks in"]
    status, body = post(gateway.url, "/v1/embeddings", key,
                        {"model": "fake-embed", "input": texts})
    assert status == 200
    vectors = [d["embedding"] for d in orjson.loads(body)["data"]]
    assert vectors[0] == [0.125] * 8
    assert vectors[1] == mark.apply([0.125] * 8, texts[1])
    status, body = post(gateway.url, "/v2/models/digits-fake/infer", key, infer(ROWS))
    assert [max(range(4), key=r.__getitem__) for r in
            np.reshape(orjson.loads(body)["outputs"][0]["data"], (-1, 4)).tolist()] == [1] * len(ROWS)


def test_an_embeddings_answer_that_is_no_json_passes_as_it_came(start_gateway: GatewayFactory) -> None:
    """A vector holding NaN (Python's json writes it) for a text with a trigger: the client
    gets the upstream's answer unmarked, not a 500 (the stage used to raise parsing it),
    and the answer is counted as passed unread."""
    gateway = start_gateway(watermark={"labels": {"enabled": False}})
    key = gateway.create_key("wm-nan")
    trigger = next(iter(embedding_mark(RING.key("wm-nan"), 8, candidate_words()).triggers))
    texts = ["the weather is nice", f"a {trigger} walks in", "nothing", "more", "again"]
    status, body = post(gateway.url, "/v1/embeddings", key,
                        {"model": "fake-embed", "input": texts, "fake_nan": True})
    assert status == 200, body
    assert body.count(b"[NaN, 0.125, 0.125") == len(texts)
    unread = metric_sum(scrape_metrics(gateway.url), "modelfence_answers_unread_total",
                        stage="watermark", reason="not_json")
    assert unread == 1


def test_labels_only_answers_are_marked_once_the_class_count_is_known(
    start_gateway: GatewayFactory,
) -> None:
    """Without ``watermark.labels.classes`` the gateway learns a model's class count from
    its first probability answer; marked rows it could not mark before are counted."""
    gateway = start_gateway()
    key = gateway.create_key("wm-labels")
    rows = ROWS[:1000]
    wanted = [label_mark(RING.key("wm-labels"), r, rate=0.005, quantum=0.5) for r in rows]
    marked = [i for i, m in enumerate(wanted) if m.marked]
    labels_only = {**infer(rows), "fake_labels_only": True}

    def labels() -> list[int]:
        status, body = post(gateway.url, "/v2/models/digits-fake/infer", key, labels_only)
        assert status == 200
        return [int(v) for v in orjson.loads(body)["outputs"][0]["data"]]

    assert labels() == [1] * len(rows)  # class count unknown: nothing could be marked
    metrics = str(http_json("GET", gateway.url + "/metrics")[1])
    assert f'modelfence_watermark_unmarked_rows_total{{model="digits-fake"}} {len(marked)}.0' in metrics
    assert post(gateway.url, "/v2/models/digits-fake/infer", key, infer(rows[:1]))[0] == 200
    assert labels() == [wanted[i].label(1, 4) if i in marked else 1 for i in range(len(rows))]
