"""Identity-disjoint train/val/test split, deterministic from a seed."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SPLITS = ("train", "val", "test")


def identity_split(
    images_per_person: Mapping[str, int],
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, str]:
    """Map every person to one split so no identity appears in two splits.

    People are shuffled with ``seed`` (after sorting, so input order does not matter) and
    dealt to test, then val, until each holds about its fraction of the *images*; the
    rest is train. Same inputs and seed -> same split.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    people = sorted(images_per_person)
    order = np.random.default_rng(seed).permutation(len(people))
    total = sum(images_per_person.values())
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    filled = {"test": 0, "val": 0}
    assignment: dict[str, str] = {}
    for i in order:
        person = people[int(i)]
        n = images_per_person[person]
        split = "train"
        for name in ("test", "val"):
            # take the person if it brings the split closer to its target
            if targets[name] > 0 and filled[name] + n / 2 <= targets[name]:
                split = name
                break
        if split != "train":
            filled[split] += n
        assignment[person] = split
    return assignment


def split_counts(assignment: Mapping[str, str], images_per_person: Mapping[str, int]) -> dict:
    """Images and people per split."""
    out = {s: {"images": 0, "people": 0} for s in SPLITS}
    for person, split in assignment.items():
        out[split]["images"] += images_per_person[person]
        out[split]["people"] += 1
    return out
