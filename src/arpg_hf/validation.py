"""Argument checks shared by the library: integers and real numbers that are not bools.

`bool` is a subclass of `int`, so `isinstance(True, int)` holds and `True` would pass as the number 1; every check of
a count, a size or a scale goes through these predicates instead, so that the rule is written once.
"""

from __future__ import annotations

import numbers


def is_int(value: object, exact: bool = False) -> bool:
    """Whether `value` is an integer and not a bool: any `numbers.Integral` (NumPy and torch integers too), or only a
    Python `int` with `exact` (for values saved into JSON configs)."""
    return isinstance(value, int if exact else numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether `value` is a real number (an integer or a float, NumPy ones too) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value: object, name: str, exact: bool = False) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= 1 (see [`is_int`] for `exact`)."""
    if not is_int(value, exact=exact) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
