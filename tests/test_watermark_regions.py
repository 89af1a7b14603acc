"""Region marks: the profile, the keyed rule, the exact test, the gateway stage and verify."""

from __future__ import annotations

import hmac
import itertools
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest

from modelfence.errors import ConfigError
from modelfence.forensics.errors import VerifyError
from modelfence.forensics.model import Suspect, verify_regions
from modelfence.identity.secret import ServerSecret
from modelfence.testing.processes import http_json
from modelfence.watermark.adapters import oip_rows
from modelfence.watermark.config import RegionsConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.regions import (
    InputProfile,
    ProfileError,
    RegionMark,
    RegionRowMark,
    Whitening,
    load_profiles,
    region_mark,
    region_p_value,
)

from .conftest import GatewayFactory
from .test_policy_gateway import post
from .test_watermark_gateway import PROBS, RING, ROWS, infer

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)
UNIT_RING = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"))
CLASSES = 10


def real_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows that use 8 of 16 features (the rest always 0, like a digit's blank border),
    and a label that is a function of them."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, 16))
    rows[:, :8] = rng.normal(5.0, 2.0, size=(n, 8))
    return rows, (rows[:, :3].sum(1) // 1.5).astype(np.int64) % CLASSES


def noisy(rows: np.ndarray, seed: int = 1) -> np.ndarray:
    return rows + np.random.default_rng(seed).normal(0.0, 0.5, size=rows.shape)


def profile(**kw: float) -> InputProfile:
    rows, labels = real_inputs(2000)
    return InputProfile.fit(rows, honest_rate=kw.get("rate", 0.0025), ridge=1e-5, rank=64, labels=labels)


def test_real_inputs_are_rarely_off_and_noisy_ones_nearly_always() -> None:
    fitted = profile()
    fresh, _ = real_inputs(20_000, seed=7)  # not the rows the threshold came from
    assert fitted.off(fresh).mean() < 2 * 0.0025
    assert fitted.off(noisy(fresh)).mean() > 0.99
    assert not fitted.off(np.zeros((3, 5))).any()  # another width: never marked


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.zeros((50, 4)), "at least 100 rows"),
        (np.zeros(400), r"\[n, features\]"),
        (np.full((200, 4), np.nan), "NaN"),
        (np.zeros((200, 5000)), "1..4096 features"),
        (np.ones((200, 4)), "all the same"),
    ],
)
def test_a_profile_that_cannot_describe_inputs_is_refused(rows: np.ndarray, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        InputProfile.fit(rows, honest_rate=0.0025, ridge=1e-5, rank=64)


def test_labels_must_be_class_indices_and_huge_rows_are_off() -> None:
    rows, labels = real_inputs(300)
    fitted = InputProfile.fit(rows, honest_rate=0.0025, ridge=1e-5, rank=64, labels=labels.astype(float))
    assert fitted.sample_labels is not None
    assert fitted.sample_labels.dtype == np.int64
    for bad in (labels + 0.5, labels - 20, labels[:10]):
        with pytest.raises(ProfileError, match="labels"):
            InputProfile.fit(rows, honest_rate=0.0025, ridge=1e-5, rank=64, labels=bad)
    assert fitted.off(np.full((2, 16), 1e200)).all()  # a distance too large to compute


def test_probe_centres_cover_a_profile_sorted_by_label() -> None:
    rows, labels = real_inputs(6000)
    order = np.argsort(labels, kind="stable")
    fitted = InputProfile.fit(rows[order], honest_rate=0.0025, ridge=1e-5, rank=64, labels=labels[order])
    assert fitted.sample_labels is not None
    assert set(fitted.sample_labels.tolist()) == set(labels.tolist())


def test_profile_files_and_config_errors_name_the_key(tmp_path: Path) -> None:
    rows, labels = real_inputs(300)
    np.save(tmp_path / "rows.npy", rows)
    np.savez(tmp_path / "both.npz", inputs=rows, labels=labels)
    np.savez(tmp_path / "bad.npz", pixels=rows)
    settings = {"a": RegionsConfig(profile_file=str(tmp_path / "rows.npy")),
                "b": RegionsConfig(profile_file=str(tmp_path / "both.npz"))}
    loaded = load_profiles(settings)
    assert loaded["a"].sample_labels is None
    assert loaded["b"].sample_labels is not None
    assert (loaded["b"].sample_labels == labels).all()
    for name, why in (("bad.npz", "no `inputs` array"), ("missing.npy", "cannot read")):
        with pytest.raises(ConfigError, match=rf"watermark\.labels\.regions\.digits\.profile_file: .*{why}"):
            load_profiles({"digits": RegionsConfig(profile_file=str(tmp_path / name))})
    with pytest.raises(ValueError, match="honest_rate"):
        RegionsConfig(profile_file="x.npy", honest_rate=0.2)


def test_the_exact_law_matches_enumerating_every_key() -> None:
    """Three (cell, label) groups, 4 classes: every assignment of shifts is enumerated and
    the share with at least the observed hits is the p-value, exactly."""
    classes = 4
    mark = region_mark(UNIT_RING.key("acme"), profile(), 1)
    rows = np.stack([mark.centre + s * mark.directions[0] for s in (1.0, -1.0)])
    # cell 1 label 0: moves 1,1,2 ; cell 0 label 0: moves 3 ; cell 1 label 2: moves 1,3,3,3
    noisy_rows = rows[[0, 0, 0, 1, 0, 0, 0, 0]]
    base = [0, 0, 0, 0, 2, 2, 2, 2]
    answers = [(b + m) % classes for b, m in zip(base, [1, 1, 2, 3, 1, 3, 3, 3], strict=True)]
    p, hits, moved = region_p_value(mark, noisy_rows, base, answers, classes)
    groups = [{1: 2, 2: 1, 3: 0}, {1: 0, 2: 0, 3: 1}, {1: 1, 2: 0, 3: 3}]
    observed = [g[mark.shift(c, lab, classes)] for g, (c, lab) in zip(groups, [(1, 0), (0, 0), (1, 2)], strict=True)]
    assert (hits, moved) == (sum(observed), 8)
    totals = [sum(g[s] for g, s in zip(groups, shifts, strict=True))
              for shifts in itertools.product((1, 2, 3), repeat=3)]
    assert p == pytest.approx(np.mean([t >= hits for t in totals]))


def test_the_test_holds_its_level_under_the_null() -> None:
    """Keys that never marked anything, scored on one suspect's answers: P(p <= a) <= a."""
    fitted = profile()
    probes = fitted.probes(0.3)
    rng = np.random.default_rng(3)
    answers = np.where(rng.random(len(probes.noisy)) < 0.4, rng.integers(0, CLASSES, len(probes.noisy)),
                       probes.labels)
    p = np.array([region_p_value(region_mark(UNIT_RING.key(f"k{i}"), fitted, 4), probes.noisy,
                                 probes.labels, answers, CLASSES)[0] for i in range(2000)])
    for level in (0.01, 0.05, 0.2):
        assert (p <= level).mean() <= level + 2.6 * np.sqrt(level / 2000)


class _Model(Suspect):
    """A suspect that answers true labels, or one client's marked labels off-distribution."""

    def __init__(self, fitted: InputProfile, rule: RegionMark | None) -> None:
        self.url, self._profile, self._rule = "memory://suspect", fitted, rule

    def classify(self, model: str, rows: Sequence[Sequence[float]]) -> tuple[list[int], int | None]:
        x = np.asarray(rows)
        labels = (x[:, :3].sum(1) // 1.5).astype(np.int64) % CLASSES
        if self._rule is not None:
            off = self._profile.off(x)
            for i, cell in zip(np.flatnonzero(off), self._rule.cells(x[off]), strict=True):
                labels[i] = (labels[i] + self._rule.shift(int(cell), int(labels[i]), CLASSES)) % CLASSES
        return labels.tolist(), CLASSES


def test_a_clone_of_one_client_is_named_among_many_and_a_clean_model_is_not() -> None:
    fitted = profile()
    clients = [f"client-{i}" for i in range(500)]

    def rule(client: str) -> RegionMark:
        return region_mark(UNIT_RING.key(client), fitted, 4)

    def rules(client: str) -> list[RegionMark]:
        return [rule(client)]

    probes = fitted.probes(0.3)
    clone = verify_regions(_Model(fitted, rule("client-17")), "m", clients, rules, probes, {},
                           classes=None)
    assert clone.client == "client-17"
    assert clone.p_value < 1e-20
    clean = verify_regions(_Model(fitted, None), "m", clients, rules, probes, {}, classes=None)
    assert clean.client is None
    assert clean.p_value > 1e-3  # its answers move with the noise, by no client's rule
    with pytest.raises(VerifyError, match="no clients"):
        verify_regions(_Model(fitted, None), "m", [], rules, probes, {}, classes=None)
    with pytest.raises(VerifyError, match="3 or more classes"):
        verify_regions(_Model(fitted, None), "m", clients, rules, probes, {}, classes=2)


def test_a_clone_made_under_an_older_key_version_is_still_named() -> None:
    fitted = profile()
    old = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"), version=1)
    new = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"), version=2)
    clients = [f"client-{i}" for i in range(50)]

    def rules(client: str) -> list[RegionMark]:
        return [region_mark(new.key(client, v), fitted, 4) for v in (1, 2)]

    suspect = _Model(fitted, region_mark(old.key("client-3"), fitted, 4))
    verdict = verify_regions(suspect, "m", clients, rules, fitted.probes(0.3), {}, classes=None)
    assert verdict.client == "client-3"


def test_a_rule_never_prints_its_key_and_two_classes_are_left_alone() -> None:
    rule = region_mark(UNIT_RING.key("acme"), profile(), 4)
    assert UNIT_RING.key("acme").subkey("regions").hex() not in repr(rule)
    assert "subkey" not in repr(rule) and "mac" not in repr(rule)
    assert RegionRowMark(rule, 3).label(1, 2) == 1
    assert RegionRowMark(rule, 3).label(1, 10) != 1


def test_a_shift_is_the_hmac_of_its_cell_and_label_as_it_always_was() -> None:
    """Marks already answered must stay verifiable: the shift of a (cell, label) pair is
    fixed by the key alone, whatever computes the HMAC."""
    key = UNIT_RING.key("acme")
    rule = region_mark(key, profile(), 4)
    for cell, label, classes in itertools.product(range(16), range(CLASSES), (3, CLASSES)):
        digest = hmac.digest(key.subkey("regions"), f"{cell}:{label}".encode(), "sha256")
        assert rule.shift(cell, label, classes) == 1 + int.from_bytes(digest[:8], "big") % (classes - 1)


def test_off_distribution_rows_are_answered_by_the_clients_rule(
    start_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    """On a profiled model: in-distribution rows pass untouched (no DAWN marks by
    default), off-distribution rows move by the client's keyed shift, two clients get
    different rules, nothing is written to the ledger, and the rows are counted."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "profile.npy", rng.normal((25.0, 30.0), (6.0, 8.0), size=(2000, 2)))
    settings = RegionsConfig(profile_file=str(tmp_path / "profile.npy"))
    fitted = load_profiles({"digits-fake": settings})["digits-fake"]
    off = fitted.off(ROWS)
    assert 0.05 < off.mean() < 0.95
    gateway = start_gateway(watermark={"labels": {"regions": {"digits-fake": {
        "profile_file": settings.profile_file}}}})
    tops = {}
    for client in ("wm-region-a", "wm-region-b"):
        key = gateway.create_key(client)
        status, body = post(gateway.url, "/v2/models/digits-fake/infer", key, infer(ROWS))
        assert status == 200
        data = np.reshape(orjson.loads(body)["outputs"][0]["data"], (-1, 4))
        assert all(sorted(row) == sorted(PROBS) for row in data.tolist())
        tops[client] = data.argmax(1)
        rule = region_mark(RING.key(client), fitted, settings.cell_bits)
        cells = rule.cells(ROWS)
        wanted = [(1 + rule.shift(int(c), 1, 4)) % 4 if o else 1 for c, o in zip(cells, off, strict=True)]
        assert tops[client].tolist() == wanted
    assert (tops["wm-region-a"] != tops["wm-region-b"]).any()
    metrics = str(http_json("GET", gateway.url + "/metrics")[1])
    assert f'modelfence_watermark_region_rows_total{{model="digits-fake"}} {2 * int(off.sum())}.0' in metrics
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM watermark_ledger").fetchone() == (0,)


def test_image_shaped_inputs_are_marked_as_their_flat_rows() -> None:
    """A client sending [n, 1, 8, 8] gets the marks of the same [n, 64] rows; before, an
    input of more than two dimensions carried no mark at all."""
    pixels = np.arange(2 * 64, dtype=float)
    flat = oip_rows({"inputs": [{"shape": [2, 64], "data": pixels.tolist()}]})
    image = oip_rows({"inputs": [{"shape": [2, 1, 8, 8], "data": pixels.tolist()}]})
    assert flat is not None
    assert image is not None
    assert (image == flat).all()
    assert oip_rows({"inputs": [{"shape": [0, 1, 8], "data": []}]}) is None


def test_up_to_rank_features_the_distance_is_the_exact_mahalanobis_one() -> None:
    rows, _ = real_inputs(500)
    rows[:, 8:] = np.random.default_rng(3).normal(0.0, 1e-3, size=(500, 8))  # nearly blank
    whitening, _ = Whitening.fit(rows, 1e-5, 16)
    cov = np.cov(rows, rowvar=False)
    precision = np.linalg.inv(cov + np.eye(16) * 1e-5 * np.trace(cov) / 16)
    centred = noisy(rows[:20]) - rows.mean(0)
    exact = np.einsum("ij,jk,ik->i", centred, precision, centred)
    assert whitening.residual_inverse_variance == 0.0
    np.testing.assert_allclose(whitening.distances(noisy(rows[:20])), exact, rtol=1e-6)


def test_a_profile_wider_than_its_rank_pools_the_rest_and_still_tells_noise_apart() -> None:
    """400 features driven by 12 factors plus a little noise of their own: rank 32 keeps
    the 16 widest directions (the factors among them) and the 16 narrowest, pools the
    rest, and real rows stay in while noisy ones fall out."""
    rng = np.random.default_rng(5)
    loadings = rng.normal(size=(12, 400))

    def wide(n: int) -> np.ndarray:
        return rng.normal(size=(n, 12)) @ loadings + rng.normal(0.0, 0.3, size=(n, 400))

    fitted = InputProfile.fit(wide(3000), honest_rate=0.0025, ridge=1e-5, rank=32)
    assert fitted.whitening.basis.shape == (400, 32)
    assert fitted.whitening.residual_inverse_variance > 0
    fresh = wide(20_000)
    assert fitted.off(fresh).mean() < 2 * 0.0025
    assert fitted.off(fresh + rng.normal(0.0, 0.25 * fitted.scale, size=fresh.shape)).mean() > 0.99
    assert fitted.off(np.full((2, 400), 1e200)).all()  # pooled: inf - inf is not a number


def test_a_wide_profile_keeps_the_narrowest_and_widest_directions_and_pools_the_middle() -> None:
    rows = np.random.default_rng(9).normal(size=(500, 40)) * np.linspace(0.1, 10.0, 40)
    whitening, _ = Whitening.fit(rows, 1e-5, 6)
    cov = np.cov(rows, rowvar=False)
    lift = 1e-5 * np.trace(cov) / 40
    values = np.linalg.eigvalsh(cov)  # ascending
    kept = np.r_[values[:3], values[-3:]]
    np.testing.assert_allclose(1.0 / whitening.inverse_variance, kept + lift, rtol=1e-9)
    np.testing.assert_allclose(1.0 / whitening.residual_inverse_variance,
                               values[3:-3].mean() + lift, rtol=1e-9)
