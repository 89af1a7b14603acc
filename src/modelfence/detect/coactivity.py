"""Linking by behaviour: keys that work in lockstep on the same kind of queries.

A careful botnet gives every key its own address, client library and header order, so
nothing in the fingerprint joins them (``linking.py``). What it cannot hide cheaply is
that one script drives them: the keys are busy in the same seconds and ask from the same
distribution. The engine compares recently busy, young keys pairwise:

- timing: the Jaccard overlap of their 10-second activity slots over the last ten minutes
  (at least ``MIN_JACCARD``, with at least ``MIN_SHARED_SLOTS`` slots in common);
- distribution: the cosine of their histograms over the reference cells of the same input
  space, at least ``MIN_COSINE``; without a reference, of how their queries differ from
  the model's recent traffic in that space, in units of the traffic's spread
  (``traffic.py``). Raw means and spreads cannot tell keys apart: any two sets of
  digit images, or of uniform noise and digits, agree above 0.8, so the rule linked every
  young key busy in the same minute, honest customers into botnets.

Pairs that pass both are linked into one entity. Only keys with at least ``MIN_QUERIES``
queries in the ten minutes are compared, which leaves out almost every person, and only
keys first seen in the last day: an established customer is judged on its own record.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from modelfence.detect.features import ClientState
from modelfence.detect.reference import Reference
from modelfence.detect.traffic import TrafficWindows, space_key

SLOT_SECONDS = 10.0
SPAN_SECONDS = 600.0
YOUNG_SECONDS = 86_400.0
MIN_QUERIES = 10
MIN_SHARED_SLOTS = 2
MIN_JACCARD = 0.5
MIN_COSINE = 0.8
MAX_PARTNERS = 20  # lockstep partners one key keeps per pass (see lockstep_pairs)
_BLOCK = 512  # keys compared at a time: memory stays ~ 512 x keys, not keys²


@dataclass(frozen=True, slots=True)
class Activity:
    """What one key did in the last ten minutes, reduced to what linking compares."""

    client: str
    space: str
    slots: frozenset[int]
    signature: np.ndarray  # unit vector: cell histogram, or the deviation from the traffic


def activity_of(
    state: ClientState, now: float, reference: Reference | None, traffic: TrafficWindows
) -> Activity | None:
    if now - state.first_ts > YOUNG_SECONDS or not state.queries:
        return None
    if state.queries[-1].event.ts < now - SPAN_SECONDS:  # idle: the common case, O(1)
        return None
    recent = [
        q for q in state.queries
        if q.event.ts >= now - SPAN_SECONDS and q.vector is not None and q.space is not None
    ]
    if len(recent) < MIN_QUERIES:
        return None
    space = Counter(q.space for q in recent).most_common(1)[0][0]
    assert space is not None
    cells = reference.spaces.get(space) if reference is not None else None
    if cells is not None:
        vectors = np.vstack([q.vector for q in recent if q.space == space and q.vector is not None])
        signature = np.bincount(
            cells.cells(vectors.astype(np.float32)), minlength=len(cells.centroids)
        ).astype(np.float32)
    else:  # compared within one model's traffic: keys of two models are not one script's
        same = [(space_key(q), q.vector) for q in recent if q.space == space]
        space = Counter(key for key, _ in same).most_common(1)[0][0]
        vectors = np.vstack([vector for key, vector in same if key == space and vector is not None])
        deviation = traffic.deviation(space, vectors)
        if deviation is None:
            return None
        signature = deviation
    norm = float(np.linalg.norm(signature))
    if not norm > 0.0 or not math.isfinite(norm):
        return None
    slots = frozenset(int(q.event.ts // SLOT_SECONDS) for q in recent)
    return Activity(state.client, space, slots, signature / norm)


def lockstep_pairs(activities: Iterable[Activity]) -> list[tuple[str, str]]:
    """Pairs of keys busy in the same slots on the same query distribution.

    Each key keeps its ``MAX_PARTNERS`` strongest partners (by slot overlap): a crowd of n
    keys in lockstep gives at most n x ``MAX_PARTNERS`` pairs instead of n² that the linker
    would keep and weigh. A crowd evenly in lockstep is still one entity (tested with 600
    keys); groups more in step within than between may stay apart, each one entity.
    """
    by_space: dict[str, list[Activity]] = {}
    for activity in activities:
        by_space.setdefault(activity.space, []).append(activity)
    pairs: set[tuple[str, int, int]] = set()
    for space, group in by_space.items():
        if len(group) < 2:
            continue
        # By client: ties among a key's partners (a script's keys often tie at Jaccard 1)
        # are broken by name, not by the order the engine happened to walk the keys in.
        group.sort(key=lambda a: a.client)
        signatures = np.vstack([a.signature for a in group])
        busy = _slot_matrix(group)
        sizes = busy.sum(axis=1)
        for start in range(0, len(group), _BLOCK):
            rows = slice(start, start + _BLOCK)
            shared = busy[rows] @ busy.T
            jaccard = shared / (sizes[rows, None] + sizes[None, :] - shared)
            linked = (
                (signatures[rows] @ signatures.T >= MIN_COSINE)
                & (shared >= MIN_SHARED_SLOTS)
                & (jaccard >= MIN_JACCARD)
            )
            for offset, row in enumerate(linked):
                i = start + offset
                row[i] = False
                partners = np.flatnonzero(row)
                if len(partners) > MAX_PARTNERS:
                    strongest = np.argsort(-jaccard[offset, partners], kind="stable")
                    partners = partners[strongest[:MAX_PARTNERS]]
                pairs.update((space, min(i, j), max(i, j)) for j in partners.tolist())
    return [(by_space[space][i].client, by_space[space][j].client) for space, i, j in sorted(pairs)]


def _slot_matrix(group: list[Activity]) -> np.ndarray:
    """One row per key, one column per slot any of them was busy in: 1.0 where busy."""
    columns = {slot: c for c, slot in enumerate(sorted(set().union(*(a.slots for a in group))))}
    busy = np.zeros((len(group), len(columns)), dtype=np.float32)
    for row, activity in enumerate(group):
        busy[row, [columns[slot] for slot in activity.slots]] = 1.0
    return busy
