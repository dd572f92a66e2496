"""Train/val/test splits: disjoint by identity, by the dataset's own folders, or the seed notebook's."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import AgeGenderError
from ..labels import age_group
from .records import Dataset, FaceRecord

log = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
PROTOCOLS: tuple[str, ...] = ("identity", "folders", "seed")


@dataclass(eq=False)
class Splits(Mapping[str, list[FaceRecord]]):
    """train/val/test record lists; a read-only mapping keyed by split name."""

    train: list[FaceRecord]
    val: list[FaceRecord]
    test: list[FaceRecord]
    protocol: str = ""

    def __getitem__(self, name: str) -> list[FaceRecord]:
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(SPLIT_NAMES)

    def __len__(self) -> int:
        return len(SPLIT_NAMES)

    def summary(self) -> dict[str, dict[str, int]]:
        """Images and distinct identities per split; identities only where the data names its people."""
        out = {}
        for name, recs in self.items():
            ids = {r.identity for r in recs if r.person_id}
            out[name] = {"images": len(recs), **({"identities": len(ids)} if ids else {})}
        return out

    def leaked_identities(self) -> int:
        """How many identities have images in more than one split (among faces with a person id)."""
        seen = collections.Counter(i for recs in self.values() for i in {r.identity for r in recs if r.person_id})
        return sum(1 for n in seen.values() if n > 1)

    def leakage(self) -> dict[str, Any]:
        """Whether one person can sit in two splits, stated with its limits: ``{"leaked_identities": int or None,
        "leakage": one sentence}``. Faces without a person id (UTKFace, FairFace) cannot be checked."""
        records = [r for recs in self.values() for r in recs]
        missing = collections.Counter(r.dataset or r.source for r in records if not r.person_id)
        unchecked = sum(missing.values())
        named = ", ".join(f"{n} in {name}" for name, n in missing.most_common())
        if unchecked == len(records):
            return {
                "leaked_identities": None,
                "leakage": f"not measurable: the data has no person ids ({named}), so one person may "
                "appear in more than one split",
            }
        ids = len({r.identity for r in records if r.person_id})
        leaked = self.leaked_identities()
        sentence = f"{leaked} of {ids} identities in more than one split"
        if unchecked:
            sentence += f"; not measurable for {unchecked} faces without person ids ({named})"
        return {"leaked_identities": leaked, "leakage": sentence}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise AgeGenderError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def identity_split(records: Sequence[FaceRecord], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> Splits:
    """Split whole identities into train/val/test, stratified by gender and Adience age group.

    Each identity's stratum is its majority gender and majority age group (ties: the lower value;
    unknown age counts as its own group). Identities are shuffled within each stratum by ``seed``; the
    strata are then laid end to end and each identity goes to the split furthest below its share of
    images so far. That keeps every stratum, even one of two people, close to ``fractions``.
    """
    fractions = _check_fractions(fractions)
    by_identity: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        by_identity[r.identity].append(i)
    strata: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for identity in sorted(by_identity):
        recs = [records[i] for i in by_identity[identity]]
        gender = _majority(r.gender for r in recs)
        group = _majority(-1 if r.age is None else age_group(r.age) for r in recs)
        strata[(gender, group)].append(identity)
    rng = np.random.default_rng(seed)
    counts = [0, 0, 0]
    assigned: list[list[int]] = [[], [], []]
    for key in sorted(strata):
        people = strata[key]
        for j in rng.permutation(len(people)):
            members = by_identity[people[j]]
            total = sum(counts) + len(members)
            split = max(range(3), key=lambda s: fractions[s] * total - counts[s])
            counts[split] += len(members)
            assigned[split].extend(members)
    train, val, test = ([records[i] for i in sorted(idx)] for idx in assigned)
    return Splits(train, val, test, "identity")


def _majority(values: Iterable[int]) -> int:
    counts = collections.Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def folder_split(records: Sequence[FaceRecord], val_fraction: float = 0.15, seed: int = 0) -> Splits:
    """The agegender folders: test = ``valid/``; ``aligned/`` is split into train/val by identity.

    ``valid/`` shares many people with ``aligned/`` in the published data, so ``leaked_identities()``
    is large here by construction.
    """
    aligned = [r for r in records if r.group == "aligned"]
    test = [r for r in records if r.group == "valid"]
    if not test or not aligned:
        raise AgeGenderError(
            "the 'folders' split needs an agegender tree with both aligned/ and valid/ "
            "folders; use the 'identity' split for other datasets"
        )
    inner = identity_split(aligned, (1 - val_fraction, val_fraction, 0.0), seed)
    return Splits(inner.train, inner.val, test, "folders")


def seed_split(records: Sequence[FaceRecord], seed: int = 0) -> Splits:
    """The seed notebook's protocol: a random 50/25/25 split of the images in each label folder of ``aligned/``.

    Records without groups (manifests, UTKFace) are split per (gender, age) label the same way. People
    leak across splits freely here; this exists to reproduce the original numbers.
    """
    pool = [r for r in records if r.group == "aligned"] or [r for r in records if not r.group]
    if not pool:
        raise AgeGenderError("the 'seed' split needs an aligned/ folder or ungrouped records")
    by_label: dict[tuple[int, int], list[FaceRecord]] = collections.defaultdict(list)
    for r in pool:
        by_label[(r.gender, -1 if r.age is None else r.age)].append(r)
    rng = np.random.default_rng(seed)
    out: tuple[list[FaceRecord], list[FaceRecord], list[FaceRecord]] = ([], [], [])
    for key in sorted(by_label):
        recs = by_label[key]
        order = rng.permutation(len(recs))
        n_train, n_val = len(recs) // 2, len(recs) // 4
        for rank, j in enumerate(order):
            out[0 if rank < n_train else 1 if rank < n_train + n_val else 2].append(recs[j])
    return Splits(*out, protocol="seed")


def make_splits(dataset: Dataset, protocol: str = "identity", seed: int = 0, limit: int = 0) -> Splits:
    """Dispatch on ``protocol``: "identity" (default), "folders" or "seed".

    ``limit > 0`` first keeps a seeded random sample of that many images (for quick runs).
    """
    records = dataset.records
    if 0 < limit < len(records):
        keep = np.random.default_rng(seed).choice(len(records), limit, replace=False)
        records = [records[i] for i in sorted(keep)]
    if protocol == "identity":
        splits = identity_split(records, seed=seed)
    elif protocol == "folders":
        splits = folder_split(records, seed=seed)
    elif protocol == "seed":
        splits = seed_split(records, seed=seed)
    else:
        raise AgeGenderError(f"unknown split protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    log.info(
        "%s split (seed %d): %s; leakage: %s",
        protocol,
        seed,
        ", ".join(f"{k} {v['images']} images/{v.get('identities', 'no')} ids" for k, v in splits.summary().items()),
        splits.leakage()["leakage"],
    )
    return splits
