"""tdx-preflight: may this Intel TDX host kexec now, and why (not).

Besides the version, the one helper every layer's messages share (the lowest layer holds
it, so that a reader's message can use it as a check's does).
"""

__version__ = "0.1.0"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 TD`, `2 TDs`, `1 process`, `3 processes` (`nouns` when adding s is wrong): a count
    with its noun, for messages a person reads."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
