"""How Earshot reads a value written as text: one rule each, for query
strings, form fields, configuration files and the environment alike."""

from __future__ import annotations

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})


def parse_bool(raw: str) -> bool:
    """``true``/``1``/``yes``/``on`` or ``false``/``0``/``no``/``off`` in any
    case, with spaces around; empty means false (a variable set to nothing, a
    form field left blank). Anything else raises ValueError: callers turn it
    into their own error, naming the field."""
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"not a boolean: {raw!r}")
