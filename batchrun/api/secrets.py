"""The one way a secret is kept out of text: redact it where the text is made.

A provider or a proxy may echo the API key in an error body ("Incorrect API key
provided: sk-..."); every message built from a provider's answer goes through
``redact`` with the key in hand, so no line, log, summary, exception or task argument
built from it can carry the key.
"""

from __future__ import annotations

__all__ = ["REDACTED", "redact"]

REDACTED = "<api key>"


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (if any) replaced by ``<api key>``."""
    return text.replace(secret, REDACTED) if secret else text
