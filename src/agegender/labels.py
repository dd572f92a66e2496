"""Labels: the gender names, the Adience age groups, and parsing of gender and age values."""

from __future__ import annotations

import re

GENDERS: tuple[str, str] = ("female", "male")  # index = label; the sigmoid output is P(male)
_GENDER_WORDS = {"f": 0, "female": 0, "woman": 0, "w": 0, "m": 1, "male": 1, "man": 1}
UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")

# The Adience age brackets, (low, high) inclusive; None = open-ended.
ADIENCE_GROUPS: tuple[tuple[int, int | None], ...] = ((0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, None))
ADIENCE_GROUP_NAMES: tuple[str, ...] = tuple(f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in ADIENCE_GROUPS)


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


MAX_AGE = 120  # years; ages and age ranges in label files must lie within 0..MAX_AGE
_AGE = re.compile(r"([+-]?[0-9]+(?:\.[0-9]*)?|[+-]?\.[0-9]+)(\+?)", re.ASCII)
_AGE_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)", re.ASCII)


def parse_age(value: str) -> int | None:
    """Years from ``"29"``, ``"29.0"``, an age group ``"20-29"`` (floor of the midpoint) or ``"70+"`` (its lower
    bound); None for an empty value.

    Raises ValueError whose message is the reason, for the caller to show after the value: ``not a number or
    range``, ``out of range (0-120)`` or ``range not ascending``.
    """
    value = value.strip()
    if not value:
        return None
    m = _AGE_RANGE.fullmatch(value)
    if m:
        if max(len(m.group(1)), len(m.group(2))) > 9:  # int() of thousands of digits is slow, then refused
            raise ValueError(f"out of range (0-{MAX_AGE})")
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi > MAX_AGE:
            raise ValueError(f"out of range (0-{MAX_AGE})")
        if lo > hi:
            raise ValueError(f"range not ascending ({lo} > {hi})")
        return (lo + hi) // 2
    m = _AGE.fullmatch(value)
    if not m:
        raise ValueError("not a number or range")
    age = float(m.group(1))
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"out of range (0-{MAX_AGE})")
    return int(age)


def parse_age_interval(value: str) -> tuple[int, int | None] | None:
    """``(low, high)`` years for an age-group label such as ``"20-29"`` or ``"70+"`` (high None: open-ended);
    None for an exact age or an empty value. A group is scored as a group, never as its midpoint.

    Raises ValueError as :func:`parse_age` does.
    """
    value = value.strip()
    age = parse_age(value)  # validates, and gives the low end of "70+"
    m = _AGE_RANGE.fullmatch(value)
    if m:
        return int(m.group(1)), int(m.group(2))
    if age is not None and value.endswith("+"):
        return age, None
    return None


def interval_name(low: float, high: float | None) -> str:
    """``"20-29"`` or ``"70+"``: the label an interval was read from."""
    return f"{int(low)}+" if high is None or high == float("inf") else f"{int(low)}-{int(high)}"
