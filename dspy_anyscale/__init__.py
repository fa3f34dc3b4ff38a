"""dspy-anyscale: the DSPy language-model backend for Anyscale-style, OpenAI-compatible endpoints.

    import dspy
    from dspy_anyscale import Anyscale

    dspy.configure(lm=Anyscale("meta-llama/Llama-2-70b-chat-hf", use_chat_api=True))

Importing the package reads no file, no environment variable and no network: configuration is
resolved when an ``Anyscale`` is constructed.
"""

from ._version import __version__
from .anyscale import Anyscale
from .errors import (
    AnyscaleError,
    ConfigurationError,
    MissingConfigurationError,
    UnexpectedResponseError,
    UnsupportedParameterError,
)
from .hf_model import HFModel

__all__ = [
    "Anyscale",
    "AnyscaleError",
    "ConfigurationError",
    "HFModel",
    "MissingConfigurationError",
    "UnexpectedResponseError",
    "UnsupportedParameterError",
    "__version__",
]
