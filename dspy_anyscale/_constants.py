"""Every default and every name the package reads from the outside world, in one place."""

from __future__ import annotations

from ._version import __version__

# --- Environment -----------------------------------------------------------------------------
# Old DSPy, LiteLLM, LangChain and LlamaIndex spell the base URL ANYSCALE_API_BASE; newer
# Anyscale docs spell it ANYSCALE_BASE_URL. The first one set wins, in this order.
ENV_API_BASE = "ANYSCALE_API_BASE"
ENV_BASE_URL_ALIAS = "ANYSCALE_BASE_URL"
ENV_API_BASE_NAMES = (ENV_API_BASE, ENV_BASE_URL_ALIAS)
ENV_API_KEY = "ANYSCALE_API_KEY"
ENV_USAGE_LOG = "ANYSCALE_USAGE_LOG"  # a JSON-lines file that gets one record per call

# --- URLs ------------------------------------------------------------------------------------
# The public multi-tenant Endpoints API closed on 2024-08-01; the URL now answers with an HTML
# notice. It is kept only to recognise it and say so, never as a default.
RETIRED_ENDPOINTS_URL = "https://api.endpoints.anyscale.com/v1"
BASE_URL_EXAMPLES = (
    "an Anyscale Service: https://<service>.anyscaleuserdata.com/v1",
    "a vLLM or llama.cpp server: http://host:port/v1",
)
CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"
MODELS_PATH = "/models"

# --- HTTP --------------------------------------------------------------------------------------
# Timeouts are always on. A number sets both phases (requests' convention); a pair is
# (connect, read). Read is the longest silence allowed between bytes: a non-streamed answer
# arrives in one piece after the whole generation, so it must cover a long completion.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
# Connections kept per host. Sized for dspy.Parallel / ThreadPoolExecutor fan-out: a pool
# smaller than the thread count serialises requests behind a free socket.
DEFAULT_POOL_SIZE = 64
USER_AGENT = f"dspy-anyscale/{__version__}"

# --- Generation defaults ---------------------------------------------------------------------
DEFAULT_NUM_RETRIES = 3
DEFAULT_TEMPERATURE = 0.0
# The old dspy Anyscale client sent 150, which cut ChainOfThought answers off mid-reasoning.
DEFAULT_MAX_TOKENS = 1024

# --- Diagnostics -------------------------------------------------------------------------------
# How much of an unexpected response body an error message quotes.
ERROR_BODY_PREVIEW_CHARS = 300
LOGGER_NAME = "dspy_anyscale"

# --- Request.config.extensions namespace owned by this package ---------------------------------
# Options for our engine rather than for the server travel in Request.config.extensions under
# this key, so they are part of DSPy's cache key and never sent on the wire.
ENGINE_EXTENSION_KEY = "dspy_anyscale"
