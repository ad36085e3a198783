"""Text that came from a peer (a site's error reason, the name it claims), made safe to print."""

from __future__ import annotations

LIMIT = 400  # characters of a message that reach a screen or a log line


def printable(text: str, limit: int = LIMIT) -> str:
    """``text`` with every character a terminal would act on (newlines, escape sequences, other
    control and format characters) written as a ``\\x..`` or ``\\u....`` escape, and cut to
    ``limit`` characters: a peer cannot forge a line of output or hide one."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in str(text))
    return out if len(out) <= limit else out[:limit - 1] + "…"
