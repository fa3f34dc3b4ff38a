"""Where OpenAI-compatible servers disagree, learned from their refusals: the JSON-mode spelling.

vLLM, Ray Serve LLM and llama.cpp take OpenAI's ``{"type": "json_schema", "json_schema": {...}}``;
llama-cpp-python's server and the old Anyscale Endpoints take ``{"type": "json_object", "schema":
{...}}`` and refuse the other (llama-cpp-python with an HTTP 500 validation error). With
``response_format_style="auto"`` a call goes out in the form the server was last found to take
(OpenAI's at first); if the server refuses it, the engine resends the same call at once in the
other form and, when that is accepted, remembers it for every later call of every instance with
the same cache identity. A server replaced behind the same URL is relearned the same way, on its
first refusal. A refusal is one that names the response format; any other error is raised as it is,
never resent. ``"openai"`` and ``"anyscale"`` force one form and learn nothing.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING

from . import _constants as C
from ._wire import ResponseFormatStyle, WireCall

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import InvalidRequestError, LM15Error, lm15
else:
    from dspy import lm15

logger = logging.getLogger(C.LOGGER_NAME)

_MENTIONS_FORMAT = re.compile(r"response_format|json_schema|json_object|\bschema\b", re.IGNORECASE)
# Statuses with which servers refuse a body they cannot read (not auth, rate limits or unknown models).
_REFUSAL_STATUSES = frozenset({400, 415, 422})
_FORMS: dict[ResponseFormatStyle, str] = {
    "openai": "the OpenAI json_schema form",
    "anyscale": "Anyscale's json_object+schema form",
}
_OTHER: dict[ResponseFormatStyle, ResponseFormatStyle] = {"openai": "anyscale", "anyscale": "openai"}


class DialectMemo:
    """Which JSON-mode form each server takes, by cache identity. Thread-safe; one per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._styles: dict[str, ResponseFormatStyle] = {}

    def style(self, identity: str, configured: str) -> ResponseFormatStyle:
        """The form to send: the configured one, or for ``auto`` what this server was found to take."""
        if configured == "anyscale":
            return "anyscale"
        if configured == "openai":
            return "openai"
        with self._lock:
            return self._styles.get(identity, "openai")

    def learn(self, identity: str, style: ResponseFormatStyle, url: str, refusal: LM15Error) -> None:
        """``style`` was accepted after the other form was refused with ``refusal``."""
        with self._lock:
            known = self._styles.get(identity, "openai")
            self._styles[identity] = style
        if known != style:
            logger.info(
                "%s refused response_format in %s (HTTP %s) and took %s: using that form for this server from now on",
                url,
                _FORMS[_OTHER[style]],
                refusal.status,
                _FORMS[style],
            )

    def forget(self) -> None:
        with self._lock:
            self._styles.clear()


MEMO = DialectMemo()


def sent_style(call: WireCall) -> ResponseFormatStyle | None:
    """The JSON-mode form ``call`` carries, or None when it has none that the other form could replace."""
    response_format = call.payload.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return "openai"
    if response_format.get("type") == "json_object" and "schema" in response_format:
        return "anyscale"
    return None


def other_style(call: WireCall) -> ResponseFormatStyle | None:
    """The form to resend ``call`` in after a refusal, or None when it has no JSON-mode form to swap."""
    style = sent_style(call)
    return _OTHER[style] if style is not None else None


def may_be_dialect_refusal(call: WireCall, error: BaseException) -> bool:
    """True when ``error`` may be the server refusing the JSON-mode form ``call`` was sent in: an
    invalid-request answer that names the response format (an unrelated 400 is not resent)."""
    if sent_style(call) is None:
        return False
    if not isinstance(error, lm15.InvalidRequestError) or isinstance(
        error, lm15.ContextLengthError | lm15.UnsupportedModelError
    ):
        return False
    if error.status is None or not (error.status in _REFUSAL_STATUSES or error.status >= 500):
        return False
    # llama-cpp-python refuses with a 5xx validation error; either way the text must be about the format.
    return bool(_MENTIONS_FORMAT.search(error.message or ""))


def both_refused(resend: WireCall, first: LM15Error, second: LM15Error) -> InvalidRequestError:
    """One error for a server that refused both JSON-mode forms (``first``, then ``second`` to ``resend``),
    quoting each refusal: the first one's text says what the server makes of the form it usually gets."""
    style = _OTHER[sent_style(resend) or "anyscale"]
    return lm15.InvalidRequestError(
        f"The server refused response_format in both JSON-mode forms: first {_FORMS[style]}: {first.message}; "
        f"then {_FORMS[_OTHER[style]]}: {second.message}. If this server or model has no schema-constrained "
        "JSON mode, build the LM with supports_response_schema=False (DSPy's adapters then ask for plain JSON)",
        provider=C.PROVIDER,
        status=first.status,
        provider_code=first.provider_code,
        request_id=second.request_id or first.request_id,
    )
