"""Where OpenAI-compatible servers disagree, learned from their refusals: the JSON-mode spelling.

vLLM, Ray Serve LLM and llama.cpp take OpenAI's ``{"type": "json_schema", "json_schema": {...}}``;
llama-cpp-python's server and the old Anyscale Endpoints take ``{"type": "json_object", "schema":
{...}}`` and refuse the other (llama-cpp-python with an HTTP 500 validation error). With
``response_format_style="auto"`` a call goes out in the OpenAI form; if the server refuses it, the
engine resends the same call at once in the Anyscale form and, when that is accepted, remembers
the server's dialect for every later call of every instance with the same cache identity.
``"openai"`` and ``"anyscale"`` force one form and learn nothing.
"""

from __future__ import annotations

import logging
import re
import threading

from dspy import lm15

from . import _constants as C
from ._wire import ResponseFormatStyle, WireCall

logger = logging.getLogger(C.LOGGER_NAME)

_MENTIONS_FORMAT = re.compile(r"response_format|json_schema|json_object|\bschema\b", re.IGNORECASE)
# Statuses with which servers refuse a body they cannot read (not auth, rate limits or unknown models).
_REFUSAL_STATUSES = frozenset({400, 415, 422})


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

    def learn(self, identity: str, style: ResponseFormatStyle, url: str, refusal: lm15.LM15Error) -> None:
        with self._lock:
            known = self._styles.get(identity)
            self._styles[identity] = style
        if known != style:
            logger.info(
                "%s refused response_format in the OpenAI json_schema form (HTTP %s) and took Anyscale's "
                "json_object+schema form: using that form for this server from now on",
                url,
                refusal.status,
            )

    def forget(self) -> None:
        with self._lock:
            self._styles.clear()


MEMO = DialectMemo()


def may_be_dialect_refusal(call: WireCall, error: BaseException) -> bool:
    """True when ``error`` may be the server refusing the OpenAI JSON-mode form of ``call``."""
    response_format = call.payload.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return False
    if not isinstance(error, lm15.InvalidRequestError) or isinstance(
        error, lm15.ContextLengthError | lm15.UnsupportedModelError
    ):
        return False
    if error.status in _REFUSAL_STATUSES:
        return True
    # A 5xx validation error (llama-cpp-python) counts only when it is about the response format.
    return error.status is not None and error.status >= 500 and bool(_MENTIONS_FORMAT.search(error.message or ""))
