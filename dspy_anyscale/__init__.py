"""dspy-anyscale: the DSPy language-model backend for Anyscale-style, OpenAI-compatible endpoints.

    import dspy
    from dspy_anyscale import Anyscale

    dspy.configure(lm=Anyscale("meta-llama/Llama-2-70b-chat-hf", use_chat_api=True))

Importing the package reads no file, no environment variable and no network: configuration is
resolved when an ``Anyscale`` is constructed.
"""

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
from .usage import UsageRecord, summarize

__all__ = [
    "CATALOG",
    "PORTKEY_GATEWAY_URL",
    "Anyscale",
    "AnyscaleError",
    "ConfigurationError",
    "HFModel",
    "InvalidParameterError",
    "Limits",
    "MissingConfigurationError",
    "ModelInfo",
    "Prices",
    "UnexpectedResponseError",
    "UnsupportedParameterError",
    "UsageRecord",
    "__version__",
    "model_info",
    "portkey_headers",
    "summarize",
]
