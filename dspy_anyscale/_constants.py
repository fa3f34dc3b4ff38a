"""Every default and every name the package reads from the outside world, in one place."""

from __future__ import annotations

from typing import Final

from ._version import __version__

# --- Environment -----------------------------------------------------------------------------
# Old DSPy, LiteLLM, LangChain and LlamaIndex spell the base URL ANYSCALE_API_BASE; newer
# Anyscale docs spell it ANYSCALE_BASE_URL. The first one set wins, in this order.
ENV_API_BASE = "ANYSCALE_API_BASE"
ENV_BASE_URL_ALIAS = "ANYSCALE_BASE_URL"
ENV_API_BASE_NAMES = (ENV_API_BASE, ENV_BASE_URL_ALIAS)
ENV_API_KEY = "ANYSCALE_API_KEY"
ENV_USAGE_LOG = "ANYSCALE_USAGE_LOG"  # a JSON-lines file that gets one record per call
ENV_MODEL = "ANYSCALE_MODEL"  # the CLI's default model
ENV_CACHE_DIR = "DSPY_ANYSCALE_CACHE"  # where the test servers are installed (default ~/.cache/dspy-anyscale)
PORTKEY_API_KEY_ENV = "PORTKEY_API_KEY"
# Secret headers a rebuilt LM (unpickled, loaded) can get back from the environment.
SECRET_HEADER_ENV = {"x-portkey-api-key": PORTKEY_API_KEY_ENV}

# --- URLs ------------------------------------------------------------------------------------
# The public multi-tenant Endpoints API closed on 2024-08-01; the URL now answers with an HTML
# notice. It is kept only to recognise it and say so, never as a default.
RETIRED_ENDPOINTS_URL = "https://api.endpoints.anyscale.com/v1"
BASE_URL_EXAMPLES = (
    "an Anyscale Service: https://<service>.anyscaleuserdata.com/v1",
    "a vLLM or llama.cpp server: http://host:port/v1",
)
PORTKEY_GATEWAY_URL = "https://api.portkey.ai/v1"
CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"
MODELS_PATH = "/models"
# llama.cpp's llama-server: what it says it is in GET /models, and where it lists its LoRA adapters
# (beside /v1, not under it).
LLAMA_CPP_OWNER = "llamacpp"
LLAMA_CPP_ADAPTERS_PATH = "/lora-adapters"

# --- HTTP --------------------------------------------------------------------------------------
# Timeouts are always on. A number sets both phases (requests' convention); a pair is
# (connect, read). Read is the longest silence allowed between bytes: a non-streamed answer
# arrives in one piece after the whole generation, so it must cover a long completion.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
# A longer limit is not a timeout (and overflows the socket layer's arithmetic).
MAX_TIMEOUT = 86_400.0
# Connections per host. Async: aiohttp's limit per event loop, a real cap (64 turned 256 concurrent
# acall into 4 waves; DSPy's own route allows 100). Sync: requests' pool_maxsize, the connections kept
# for reuse, opened lazily, so a large value costs nothing until threads use it.
DEFAULT_POOL_SIZE = 256
USER_AGENT = f"dspy-anyscale/{__version__}"

# ``Anyscale.models()`` (GET /models) lists what is served: a short answer, so a shorter read limit.
DEFAULT_MODELS_READ_TIMEOUT = 30.0

# --- Generation defaults ---------------------------------------------------------------------
# JSON mode: "auto" sends OpenAI's form and learns a server's own from its refusal (_dialects.py).
DEFAULT_RESPONSE_FORMAT_STYLE: Final = "auto"  # Final: a literal type, as the parameter is
DEFAULT_NUM_RETRIES = 3
# The longest Retry-After DSPy is allowed to wait; a server asking for more fails the call at once
# (a 429 with Retry-After: 99999 would otherwise sleep 27.7 hours).
DEFAULT_MAX_RETRY_WAIT = 60.0
DEFAULT_TEMPERATURE = 0.0
# The old dspy Anyscale client sent 150, which cut ChainOfThought answers off mid-reasoning.
DEFAULT_MAX_TOKENS = 1024

# --- Diagnostics -------------------------------------------------------------------------------
# How much of an unexpected response body an error message quotes.
ERROR_BODY_PREVIEW_CHARS = 300
# A key this long is random enough to be removed from text wherever it appears; a shorter one
# only where it stands as a whole token ("x" must not turn "exist" into "e***ist").
MIN_REDACTED_INSIDE_WORDS = 8
LOGGER_NAME = "dspy_anyscale"
# The provider name on every lm15 error and in DSPy's error messages.
PROVIDER = "anyscale"

# --- Request.config.extensions namespace owned by this package ---------------------------------
# Options for our engine rather than for the server (the endpoint, the cache identity) travel in
# Request.config.extensions under this key, and in program calls under metadata[this key], so
# they are part of DSPy's cache key; the engine takes them off before the wire.
ENGINE_EXTENSION_KEY = "dspy_anyscale"
# Headers that say nothing about the answer (tracing, logging): left out of the cache identity.
NON_ROUTING_HEADERS = frozenset(
    {
        "x-portkey-trace-id",
        "x-portkey-metadata",
        "x-portkey-span-id",
        "x-portkey-parent-span-id",
        "x-portkey-span-name",
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
    }
)

# === Client-side limits (dspy_anyscale.limits) =====================================================
# --- Limits: Rate buckets --------------------------------------------------------------------------------
# A bucket holds one second's worth of its per-minute rate, so a burst after a quiet spell is at
# most one second of traffic, never a whole minute's.
BUCKET_SECONDS = 1.0
# The request bucket always holds at least one request, or requests_per_minute < 60 could never send.
MIN_REQUEST_BUCKET = 1.0
# The token bucket holds at least one token for the same reason (tokens_per_minute < 60).
MIN_TOKEN_BUCKET = 1.0
# Refill arithmetic in floats leaves crumbs: a level this close to what is needed counts as enough.
LEVEL_EPSILON = 1e-9

# --- Limits: Shared cool-down after a 429 --------------------------------------------------------------------
# A 429 without Retry-After still pauses every caller this long (DSPy's first backoff is 1 s too).
DEFAULT_COOLDOWN_S = 1.0
# A Retry-After longer than this is capped: a broken header must not park the LM for hours.
MAX_COOLDOWN_S = 600.0

# --- Limits: Money -----------------------------------------------------------------------------------------
# Money is kept in integer pico-USD: sums of floats drift, and "spent never exceeds the budget"
# must hold exactly, not within rounding. 1 token at 0.15 USD per million tokens is 150_000 pico-USD.
PICO_PER_USD = 10**12
TOKENS_PER_PRICE_UNIT = 10**6  # prices are USD per million tokens

# --- Limits: Prompt-token estimate (no tokenizer) ------------------------------------------------------------
# Measured against Llama 2/3, GPT-2, Phi-3, Qwen2, DeepSeek and Claude tokenizers: ASCII letters and
# spaces run 3.3-4.3 characters per token in prose, code and JSON; Llama 2 spends a token on every
# digit and newline; byte-level tokenizers spend at most one token per UTF-8 byte. Counting letters
# at 3 per token, every other ASCII character as a token and every non-ASCII byte as a token errs
# high: 1.3-1.8x the real count on natural text, and above it on every adversarial sample checked.
ESTIMATE_LETTERS_PER_TOKEN = 3
# Chat templates add role markers around each message (Llama 2 [INST]/<<SYS>>, ChatML, Llama 3
# headers: 4-10 tokens) and a BOS plus the assistant header to the request.
ESTIMATE_TOKENS_PER_MESSAGE = 8
ESTIMATE_TOKENS_PER_REQUEST = 8

# --- Limits: Ray ledger --------------------------------------------------------------------------------------
# The ledger actor only does bookkeeping: it must not hold a CPU that the job's actors need.
RAY_LEDGER_NUM_CPUS = 0.0
RAY_LEDGER_NAME_PREFIX = "dspy-anyscale-ledger"
# Settlements a process has sent the ledger actor and not yet seen applied; past this many, the
# finished ones are dropped from the list (it would otherwise grow with every request).
RAY_LEDGER_PENDING_PRUNE_AT = 64

# --- Ray entry points (dspy_anyscale.ray) ------------------------------------------------------------
# Actors of a run's (or a pool's) pool, and the threads each runs rows on: at most
# concurrency x threads_per_actor requests are in flight.
RAY_DEFAULT_CONCURRENCY = 4
RAY_DEFAULT_THREADS_PER_ACTOR = 8
# CPUs each actor reserves: it waits on the network, so a fraction.
RAY_DEFAULT_NUM_CPUS = 0.25
# Rows sent to an actor at a time.
RAY_DEFAULT_BATCH_SIZE = 32
# The score of a row whose program raised, as dspy.Evaluate's failure_score.
RAY_DEFAULT_FAILURE_SCORE = 0.0
# A warm pool: dead workers replaced over its life, and how long a worker may take to start
# (import DSPy, build its LM).
RAY_POOL_MAX_RESTARTS = 3
RAY_POOL_START_TIMEOUT_S = 300.0
# Batches a pool worker holds at once: the second fills its threads while the first one's last
# rows finish, so a batch's tail never leaves threads idle. Requests in flight stay bounded by
# the worker's threads, which both batches share.
RAY_POOL_BATCHES_PER_WORKER = 2
# How often a pool run looks at workers that are (re)starting.
RAY_POOL_POLL_S = 1.0

# --- Long runs: output, resume, progress, interruption (dspy_anyscale.runs) ----------------------------
# Threads of a local run (dspy_anyscale.run_program / evaluate): rows, and so requests, in flight at once.
RUNS_DEFAULT_NUM_THREADS = 16
# How often the run's loop wakes up when no row has finished: to see a Ctrl-C, to refresh the progress.
RUNS_POLL_S = 0.1
# After the first Ctrl-C (or a budget used up), how long the rows in flight may take to finish and be
# written; those still running then are left to the resumed run.
RUNS_INTERRUPT_WAIT_S = 60.0
# Output: what each kind of path is. A path with another suffix is refused; one without is a directory.
RUNS_JSONL_SUFFIXES = (".jsonl", ".ndjson")
RUNS_PARQUET_SUFFIX = ".parquet"
# JSONL: every row is flushed to the operating system as it is written (a killed process loses only the
# rows in flight); fsync (the disk itself, for a machine that loses power) at most this often, and at the end.
RUNS_FSYNC_INTERVAL_S = 1.0
# How much of a JSONL file's end is read at a time, looking for the last whole line to resume from.
RUNS_TAIL_READ_BYTES = 65536
# Parquet: rows are written as part files (one row group each, readable on their own, on any filesystem):
# a part when this many rows have finished, or this many seconds after its first row.
RUNS_PARQUET_PART_ROWS = 1000
RUNS_PARQUET_PART_SECONDS = 10.0
# The manifest (what the run was: signatures, input columns, id column): beside a JSONL file
# (results.jsonl.manifest.json), inside a Parquet directory (readers skip names starting with "_"),
# in the parts directory of a .parquet file (results.parquet.parts/) while it is written.
RUNS_MANIFEST_SUFFIX = ".manifest.json"
RUNS_MANIFEST_NAME = "_manifest.json"
RUNS_PARTS_SUFFIX = ".parts"
RUNS_MANIFEST_FORMAT = "dspy-anyscale run"
RUNS_MANIFEST_VERSION = 1
# The key under which a .parquet file's schema metadata holds its manifest.
RUNS_PARQUET_METADATA_KEY = "dspy_anyscale.manifest"
# A row_id made from the input fields: this many hex digits of their SHA-256 (64 bits: at 500,000 rows
# the chance of any two distinct inputs sharing one is about 1 in 100 million).
RUNS_ROW_ID_DIGITS = 16
# Progress without a terminal: a log line this often (and at the start and the end).
RUNS_PROGRESS_LOG_INTERVAL_S = 30.0
# Progress on a terminal: the bar is redrawn at most this often.
RUNS_PROGRESS_REFRESH_S = 0.5

# --- Usage records ---------------------------------------------------------------------------------
# Records an LM keeps in memory (lm.usage); the usage log file keeps everything.
USAGE_RECORDS_KEPT = 10_000
# What `python -m dspy_anyscale usage --by ...` and usage.summarize(by=...) group calls by: a record's
# field (endpoint: the service that answered, a Router's member name or the LM's host:port; module:
# the DSPy module that made the call, e.g. generate_query.predict).
USAGE_SUMMARY_GROUPS = ("model", "endpoint", "module")
# Finding a module's name in its parent (dspy_anyscale._attribution) searches lists and dicts the parent
# holds up to this length: it runs on every call, and a longer one (a corpus) holds no modules.
ATTRIBUTION_LARGEST_CONTAINER = 256
# An x-ratelimit-* header value is kept to this many characters (records and spans are no place for a
# gateway's essay).
RATE_LIMIT_HEADER_CHARS = 64

# --- CLI -------------------------------------------------------------------------------------------
# `python -m dspy_anyscale demo`: room for a ChainOfThought's reasoning and answer from a small model.
DEMO_MAX_TOKENS = 256

# --- Cache identity: routing secrets (dspy_anyscale._identity) -------------------------------------
# Secrets that also choose where a request goes, by the last words of their name: a Portkey virtual
# key (the x-portkey-virtual-key header, a config target's virtual_key) names the upstream provider
# and account. They join the cache identity as a keyed digest (HMAC); other secrets stay out of it.
ROUTING_SECRET_WORDS = (("virtual", "key"),)
# The HMAC key: a file of random bytes made once per user (mode 0600) in the project's cache dir
# ($DSPY_ANYSCALE_CACHE or this default); the variable below points at another one, e.g. a file
# shared by the machines that share a DSPy disk cache.
DEFAULT_CACHE_DIR = "~/.cache/dspy-anyscale"
ENV_IDENTITY_KEY_FILE = "DSPY_ANYSCALE_IDENTITY_KEY_FILE"
IDENTITY_KEY_FILE_NAME = "identity.key"
IDENTITY_KEY_MIN_BYTES = 32

# --- Streams -----------------------------------------------------------------------------------------
# How long closing a sync stream waits for its cancelled request to stop (it normally takes
# milliseconds), so that the call's usage record, with its attempt, exists when close() returns.
STREAM_STOP_WAIT_S = 5.0

# --- Limits: a true upper bound of prompt tokens, for budgets (dspy_anyscale.limits._estimate) -------
# A byte-level BPE (GPT, Llama 3, Qwen, Mistral's tekken) never spends more than one token per UTF-8
# byte, and SentencePiece with byte fallback at most one more per text (its leading-space piece), so
# a prompt's UTF-8 bytes bound its tokens whatever the tokenizer. Budgets reserve that bound plus the
# chat template's markers: per message (role headers, end-of-turn: 4-12 tokens on Llama 2/3, ChatML,
# Mistral) and per request (BOS, the assistant header, a default system line such as Llama 3.1's dates
# or Qwen's "You are Qwen...": up to ~25 tokens).
BOUND_TOKENS_PER_MESSAGE = 16
BOUND_TOKENS_PER_REQUEST = 64

# --- Limits: the gate (dspy_anyscale.limits._gate) -----------------------------------------------------
# How often a caller queued for a slot looks again whether the tasks ahead of it (or holding slots)
# belong to an event loop that has stopped: such tasks cannot take their turn or free their slot, and
# nothing else would wake the queue. Cheap (one lock, a few attribute reads); only waiting callers poll.
GATE_STALL_CHECK_S = 0.25

# --- Router (dspy_anyscale.router) ------------------------------------------------------------------
# The strategy a Router uses when none is named: try the members in the order given.
ROUTER_DEFAULT_STRATEGY = "fallback"
# Consecutive failures (5xx, timeouts, resets, 429s) after which a member is skipped for
# ROUTER_COOLDOWN_S, then given one trial request (half-open). LiteLLM's Router defaults, which
# users of routers know: allowed_fails=3, cooldown_time=5 s.
ROUTER_ALLOWED_FAILS = 3
ROUTER_COOLDOWN_S = 5.0
# Answered calls per member whose latency makes its moving p50 (the "latency" strategy, health()).
ROUTER_LATENCY_WINDOW = 32
# Active probes (health_check_interval_s=...) of cooling members: GET /models with these timeouts
# (connect, read), short: a probe that hangs would delay the next one.
ROUTER_PROBE_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, 10.0)
# How long close() waits for the probe thread to notice it should stop (it is a daemon thread:
# it never keeps the process alive, whatever happens here).
ROUTER_PROBE_STOP_WAIT_S = 2.0
# A Portkey target without "weight" counts as this in a loadbalance config (Portkey's default).
ROUTER_DEFAULT_WEIGHT = 1.0
# How much of each member's error the final error's note quotes (the note names every member tried).
ROUTER_NOTE_CHARS = 300

# --- Fine-tuning on this machine (dspy_anyscale.finetune.LocalLoRAProvider) -------------------------
# LoRA on the stand-in's SmolLM2-135M: 20 steps of r=8 on q_proj/v_proj teach it a style (a sign-off,
# a format) in ~10-60 s on 2 CPU cores; more steps or a higher rank for real tasks (train_kwargs).
FINETUNE_DEFAULTS: Final = {
    "steps": 20,
    "rank": 8,
    "alpha": 16,
    "dropout": 0.0,
    "learning_rate": 1e-3,
    "seed": 0,
    "max_length": 1024,  # tokens per conversation; longer ones keep their end (the answer)
    "batch_size": 1,
    "target_modules": ("q_proj", "v_proj"),
    "threads": 2,  # torch's CPU threads in the training process
}
# The pinned training environment (LocalLoRAProvider's default interpreter in tests and CI: a venv
# under <cache>/finetune/venv). torch: only this CPU build is on the machine's wheel cache; any other
# spec pulls a multi-GB CUDA build from PyPI.
FINETUNE_ENV_PACKAGES = (
    "torch==2.13.0",
    "transformers==4.57.6",
    "peft==0.21.0",
    "gguf==0.19.0",
    "safetensors==0.8.0",
)
# Seconds: how long an install waits for another process installing the same environment, and for
# `python -V` of the new one.
FINETUNE_ENV_LOCK_TIMEOUT_S = 1800.0
FINETUNE_ENV_CHECK_TIMEOUT_S = 300.0
# Seconds: starting the provider's llama-server with its adapters (it takes < 1 s here), and how long
# cancel() and close() wait after SIGTERM before SIGKILL.
FINETUNE_SERVER_READY_S = 60.0
FINETUNE_STOP_WAIT_S = 5.0
# The lines of a failed step's log quoted in its FinetuneError (the whole log stays on disk).
FINETUNE_LOG_TAIL_LINES = 20

# === Anyscale Services and Jobs (extra [anyscale]: the anyscale SDK) ================================
# Ray Serve LLM's OpenAI-compatible routes are under the service's query_url.
SERVICE_API_PATH = "/v1"
# Anyscale's documented header that sends a request to one version of a service during a rollout
# ("primary", "canary", or a version's name); without it the load balancer splits by the weights.
# Not in the SDK: docs.anyscale.com, "Query a specific version during a rollout".
SERVICE_VERSION_HEADER = "X-ANYSCALE-VERSION"
SERVICE_VERSIONS = ("primary", "canary")
# Service states (the SDK's ServiceState) in which the service answers queries.
SERVICE_SERVING_STATES = frozenset({"RUNNING", "UPDATING", "ROLLING_OUT", "ROLLING_BACK", "UNHEALTHY"})

# AnyscaleJobsProvider: a LLaMA-Factory LoRA SFT job. Keys are LLaMA-Factory's own train arguments
# (train_kwargs= overrides any of them); the values are its documented LoRA SFT example's.
ANYSCALE_LORA_DEFAULTS: Final = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target": "all",
    "num_train_epochs": 3.0,
    "learning_rate": 1.0e-4,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "cutoff_len": 2048,
    "bf16": True,
    "logging_steps": 10,
    "seed": 0,
}
# LLaMA-Factory's chat template for a base model, by a word of its name (template= overrides).
ANYSCALE_LORA_TEMPLATES: Final = (
    ("llama-3", "llama3"),
    ("llama3", "llama3"),
    ("qwen3", "qwen3"),
    ("qwen", "qwen"),
    ("mistral", "mistral"),
    ("mixtral", "mistral"),
    ("gemma", "gemma"),
    ("phi-3", "phi"),
    ("smollm", "default"),
)
# What the job installs on top of its image (requirements= overrides): LLaMA-Factory's CLI.
ANYSCALE_JOB_REQUIREMENTS: Final = ("llamafactory",)
# Seconds between status polls of a running job, and the longest a job is followed before the
# provider gives up on it (the job itself keeps running: cancel() terminates it).
ANYSCALE_JOB_POLL_S = 10.0
ANYSCALE_JOB_TIMEOUT_S = 24 * 3600.0
# Lines of a failed job's log quoted in its FinetuneError.
ANYSCALE_JOB_LOG_TAIL_LINES = 40

# --- Stand-in servers (dspy_anyscale.servers) ---------------------------------------------------------
# Inference threads of llama-server and llama-cpp-python. One: llama.cpp's threads wait for each other
# at every operation, so two threads on a two-core machine where anything else runs (a second server,
# Ray, the test process) crawl. Measured, 5 answers of 48 tokens on 2 cores: 2 threads 3.4 s alone and
# 165 s beside one busy process (--poll 0: 155 s); 1 thread 5.8 s alone and 7.3 s beside it.
STAND_IN_THREADS = 1
