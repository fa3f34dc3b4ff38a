"""DSPy's adapter marker, passed on to the member.

DSPy 3.4 warns when a user calls an LM with ``messages=`` (deprecated), except for the one call its
adapter makes, which it marks (``adapter_message_call``) with the LM and the messages. The adapter
marks its call of the Router; the Router's call of the member must carry the mark too, or the
member would warn.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

try:
    from dspy.clients._deprecation import _adapter_call, adapter_message_call
except ImportError:  # pragma: no cover - a DSPy without the marker warns for nobody
    _adapter_call = None


def from_adapter(router: Any, messages: Any) -> bool:
    """True when this ``messages=`` call is the one DSPy's adapter made of ``router``."""
    if messages is None or _adapter_call is None:
        return False
    origin = _adapter_call.get()
    return origin is not None and origin[0] is router and origin[1] is messages


def as_adapter_call(lm: Any, messages: Any) -> AbstractContextManager[Any]:
    """The adapter's call, made of the member: DSPy knows it is not a user's messages= call."""
    marker: AbstractContextManager[Any] = adapter_message_call(lm, messages)
    return marker
