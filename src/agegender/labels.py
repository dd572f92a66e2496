"""Labels: the gender names, the Adience age groups, and parsing of gender and age values."""

from __future__ import annotations

import re

GENDERS: tuple[str, str] = ("female", "male")  # index = label; the sigmoid output is P(male)
_GENDER_WORDS = {"f": 0, "female": 0, "woman": 0, "w": 0, "m": 1, "male": 1, "man": 1}
UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")

# The Adience age brackets, (low, high) inclusive; None = open-ended.
ADIENCE_GROUPS: tuple[tuple[int, int | None], ...] = (
    (0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, None))
ADIENCE_GROUP_NAMES: tuple[str, ...] = tuple(
    f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in ADIENCE_GROUPS)


def age_group(age: int) -> int:
    """Index into ``ADIENCE_GROUPS`` for an age in years.

    Adience leaves gaps between brackets (3, 7, 14, 21-24, ...). An age in a gap goes to the nearest
    bracket by distance in years; a tie goes to the younger bracket (3 -> 0-2, 35 -> 25-32, 36 -> 38-43).
    """
    def distance(bracket: tuple[int, int | None]) -> int:
        lo, hi = bracket
        return max(lo - age, 0 if hi is None else age - hi, 0)

    # min() keeps the first of equal distances, and the brackets run young to old.
    return min(range(len(ADIENCE_GROUPS)), key=lambda i: distance(ADIENCE_GROUPS[i]))



def parse_gender(value: str) -> int | None:
    """0 (female) or 1 (male) from M/F/male/female/man/woman, any case; None when unrecognised."""
    return _GENDER_WORDS.get(value.strip().lower())


def parse_age(value: str) -> int | None:
    """Years from ``"29"``, ``"29.0"``, an age group ``"20-29"`` (floor of the midpoint) or ``"70+"`` (its lower
    bound); None for an empty value. Raises ValueError otherwise."""
    value = value.strip()
    if not value:
        return None
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", value)
    if m:
        return (int(m.group(1)) + int(m.group(2))) // 2
    age = float(value[:-1] if value.endswith("+") else value)
    if not 0 <= age < 150:
        raise ValueError(f"age {value!r} out of range")
    return int(age)
