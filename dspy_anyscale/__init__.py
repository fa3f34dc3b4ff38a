"""dspy-anyscale: the DSPy language-model backend for Anyscale-style, OpenAI-compatible endpoints.

    import dspy
    from dspy_anyscale import Anyscale

    dspy.configure(lm=Anyscale("meta-llama/Llama-2-70b-chat-hf", use_chat_api=True))

Importing the package reads no file, no environment variable and no network: configuration is
resolved when an ``Anyscale`` is constructed.
"""

import importlib as _importlib
import typing as _typing

from ._version import __version__
from .anyscale import Anyscale
from .catalog import CATALOG, ModelInfo, Prices, model_info
from .errors import (
    AnyscaleError,
    ConfigurationError,
    InvalidParameterError,
    MissingConfigurationError,
    UnexpectedResponseError,
    UnsupportedParameterError,
)
from .gateway import PORTKEY_GATEWAY_URL, portkey_headers
from .hf_model import HFModel
from .limits import Limits
from .router import MemberHealth, Router
from .usage import UsageRecord, summarize

if _typing.TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from .runs import RunResult, evaluate, run_program

# Loaded on first use: long runs (dspy_anyscale.runs) are not part of the import's cost.
_LAZY = {"RunResult": ".runs", "evaluate": ".runs", "run_program": ".runs"}

__all__ = [
    "CATALOG",
    "PORTKEY_GATEWAY_URL",
    "Anyscale",
    "AnyscaleError",
    "ConfigurationError",
    "HFModel",
    "InvalidParameterError",
    "Limits",
    "MemberHealth",
    "MissingConfigurationError",
    "ModelInfo",
    "Prices",
    "Router",
    "RunResult",
    "UnexpectedResponseError",
    "UnsupportedParameterError",
    "UsageRecord",
    "__version__",
    "evaluate",
    "model_info",
    "portkey_headers",
    "run_program",
    "summarize",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
