"""Quoting what a server sent, short and on one line, for error messages. Pure."""

from __future__ import annotations

import re

from . import _constants as C

_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def preview(body: bytes | str, limit: int = C.ERROR_BODY_PREVIEW_CHARS) -> str:
    """A short, single-line quotation of a body, with HTML tags stripped."""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = _SPACE.sub(" ", _TAGS.sub(" ", raw)).strip() or _SPACE.sub(" ", raw).strip()
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit] + "…"
