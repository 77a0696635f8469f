"""Exchange and symbol names: the one rule every input and every query parameter uses.

A name is 1-40 characters: a letter or digit, then letters, digits, ``.``, ``_``, ``/`` or
``-`` (no ``:``, which separates ``exchange:symbol`` in topic keys and Redis keys).
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "NAME_RE", "is_name"]

#: the rule as a regular expression (also published in ``/openapi.json``)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,39}$"
NAME_RE = re.compile(NAME_PATTERN)


def is_name(value: object) -> bool:
    """Whether ``value`` is a string that is a valid exchange or symbol name."""
    return isinstance(value, str) and NAME_RE.match(value) is not None
