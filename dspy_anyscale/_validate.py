"""Every check of what a user passes to a constructor or an entry point: one layer, one error family.

``Anyscale(...)``, ``Anyscale.models(...)``, ``Limits(...)``, the direct call surface and the Ray
entry points (``run_program``, ``evaluate``, ``ProgramPool``, ``summarize_run``) check what they are
given with the functions here, before any request and before any Ray work. A wrong value is a
:class:`~dspy_anyscale.errors.ConfigurationError` (a ValueError) wherever it is given; a wrong
generation parameter is an :class:`~dspy_anyscale.errors.InvalidParameterError`, a kind of it (and a
TypeError), checked against its row of the parameter table (``_params.PARAMETERS``: a parameter's
check is part of its row, so adding one stays one row). Limits are one value, ``Limits``, which
checks its fields with the functions here whoever builds it. A keyword a function does not take is
Python's own ``TypeError``, as for any function.

Each message names what was wrong and what it takes. A value that could be a secret put in the
wrong place (an object, a header value) is described by its type only.

This module sits at the bottom of the package: it imports the errors, the constants and the
parameter table, and nothing above them (a check that needs one of the package's classes, the
LM's or the pool's, is given it), so every layer uses it without an import cycle.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, Protocol, TypeVar
from urllib.parse import SplitResult, urlsplit

import dspy

from . import _constants as C
from ._params import plan_direct_call
from .errors import ConfigurationError, InvalidParameterError

# --- the message ---------------------------------------------------------------------------------


def fail(name: str, expected: str, value: Any, *, show: bool = True) -> NoReturn:
    """Refuse ``value`` for ``name``: "<name> must be <expected>, got <what it was>".

    ``show=False`` for values that may be anything (an object, a key in the wrong place): the
    message then gives their type only.
    """
    shown = f"{type(value).__name__} {reprlib.repr(value)}" if show else type(value).__name__
    raise ConfigurationError(f"{name} must be {expected}, got {shown}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- plain values ----------------------------------------------------------------------------------


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(name, "True or False", value)
    return value


def check_text(name: str, value: Any) -> str | None:
    """A string or None."""
    if value is not None and not isinstance(value, str):
        fail(name, "a string or None", value, show=False)
    return value


def check_lora_adapter(value: Any) -> str | None:
    """A LoRA adapter's name (what the server lists it as), or None for the base model."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        fail("adapter", "the adapter's name as the server lists it (a non-empty string) or None", value)
    return value


def check_provider(value: Any) -> Any:
    """A DSPy ``Provider`` instance (``dspy.clients.Provider``), or None."""
    if value is None:
        return None
    if isinstance(value, type) or not callable(getattr(value, "finetune", None)):
        raise ConfigurationError(
            f"provider must be a DSPy Provider instance (e.g. dspy_anyscale.finetune.LocalLoRAProvider()); "
            f"got {value!r}"
        )
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_count(name: str, value: Any, minimum: int) -> int:
    """An int of at least ``minimum``."""
    if not _is_int(value) or value < minimum:
        fail(name, f"an integer >= {minimum}", value)
    return int(value)


def check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if not _is_int(value) or value < 1:
            fail(name, "a positive int", value)


def check_positive_number(name: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        fail(name, "a positive number", value)


def check_seconds(name: str, value: Any) -> float:
    """A duration a setting allows: 0 up to a day."""
    if not is_number(value) or not 0 <= value <= C.MAX_TIMEOUT:
        raise ConfigurationError(f"{name} must be a number of seconds from 0 to {C.MAX_TIMEOUT:g}, got {value!r}")
    return float(value)


# --- the LM's settings ---------------------------------------------------------------------------


def check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip() or model != model.strip() or model.endswith("/"):
        raise ConfigurationError(
            "model must be a non-empty string without surrounding spaces or a trailing '/', e.g. "
            f"'meta-llama/Llama-2-70b-chat-hf'; got {model!r}"
        )
    return model


def check_template(template: Any) -> str | None:
    if template is not None and (not isinstance(template, str) or template.count("{prompt}") != 1):
        raise ConfigurationError(
            f"prompt_template must contain '{{prompt}}' exactly once, e.g. '[INST]{{prompt}}[/INST]'; got {template!r}"
        )
    return template


def check_generation_defaults(options: Mapping[str, Any]) -> None:
    """The constructor's generation defaults, checked as every call will send them (each against its
    row of the parameter table, and together: ``max_tokens`` against ``max_completion_tokens``, ...):
    a wrong one is refused now, not at the first call."""
    plan_direct_call(options, {})


def normalize_base_url(url: object, origin: str = "api_base") -> str:
    """Check a base URL and strip its trailing slash; refuse what cannot be a base URL.

    ``origin`` names where it came from (``api_base``, an environment variable, ``.env``).
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"{origin} must be a string URL, got {type(url).__name__}")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    _check_url_parts(url, parts, origin)
    for suffix in (C.CHAT_PATH, C.COMPLETIONS_PATH):
        if parts.path.endswith(suffix):
            base = url[: -len(suffix)]
            raise ConfigurationError(
                f"{origin} should be the base URL, not an endpoint: use {base!r} instead of {url!r}"
            )
    if url == C.RETIRED_ENDPOINTS_URL:
        warnings.warn(
            f"{C.RETIRED_ENDPOINTS_URL} is the public Anyscale Endpoints API, which closed on 2024-08-01 "
            "and now answers with an HTML notice. Point api_base at your own deployment "
            f"({'; '.join(C.BASE_URL_EXAMPLES)}).",
            UserWarning,
            stacklevel=4,
        )
    return url


def _check_url_parts(url: str, parts: SplitResult, origin: str) -> None:
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{origin} must be an http(s) URL such as http://host:port/v1, got {url!r}")
    if parts.username or parts.password:
        # Credentials in the URL would end up in logs and error messages.
        raise ConfigurationError(
            f"{origin} contains credentials (user:password@host); remove them and pass the key as "
            f"api_key=... or {C.ENV_API_KEY}"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{origin} must not carry a query string or fragment: {url!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in url) or not url.isascii():
        raise ConfigurationError(
            f"{origin} must be an ASCII URL without spaces or control characters, got {url!r} "
            "(percent-encode a path segment that needs them)"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigurationError(f"{origin} has an invalid port (1-65535): {url!r}")


def check_timeout(timeout: Any) -> tuple[float, float]:
    """(connect, read) seconds: a number sets both, a pair is (connect, read). ``None`` is refused: timeouts stay on."""
    if timeout is None:
        raise ConfigurationError(
            "timeout=None would let a stalled server hang the program forever; pass seconds, "
            "e.g. timeout=60 or timeout=(5, 600) for (connect, read)"
        )
    if isinstance(timeout, tuple | list):
        if len(timeout) != 2:
            raise ConfigurationError(f"timeout pair must be (connect, read), got {timeout!r}")
        connect, read = timeout
    else:
        connect = read = timeout
    for name, value in (("connect", connect), ("read", read)):
        if not is_number(value) or not 0 < value <= C.MAX_TIMEOUT:
            raise ConfigurationError(
                f"timeout {name} must be a positive number of seconds up to {C.MAX_TIMEOUT:g} (a day), got {value!r}"
            )
    return float(connect), float(read)


def check_usage_log_path(usage_log: Any, origin: str) -> str:
    """A file the usage log can be written to, ``~`` expanded; ``origin`` names the setting."""
    if not isinstance(usage_log, str | os.PathLike):
        raise ConfigurationError(f"usage_log must be a file path (str or os.PathLike), got {type(usage_log).__name__}")
    path = os.path.expanduser(os.fspath(usage_log))
    if not path or "\0" in path:
        raise ConfigurationError(f"{origin} must be a file path, got {usage_log!r}")
    if os.path.isdir(path):
        raise ConfigurationError(f"{origin} is a directory ({path}); give a file path such as {path}/usage.jsonl")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigurationError(f"{origin} cannot be created: {parent} is a file, not a directory")
    return path


# RFC 9110 field names; values are visible ASCII, space and tab (no CR/LF: no header injection).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
# Headers that frame the HTTP message: the transport sets them, a user value would corrupt it.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection"})


def check_headers(headers: Any) -> dict[str, str]:
    """Extra headers as a plain dict, refused (without quoting values, which may be secret) when unsendable."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a dict of header name to value, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ConfigurationError(f"headers: {name!r} is not a valid header name")
        if name.lower() in _FRAMING_HEADERS:
            raise ConfigurationError(f"headers: {name} is set by the HTTP client and cannot be overridden")
        if not isinstance(value, str):
            raise ConfigurationError(f"headers[{name!r}] must be a string, got {type(value).__name__}")
        if not _HEADER_VALUE.match(value):
            raise ConfigurationError(
                f"headers[{name!r}] contains a line break, a control or a non-ASCII character; header values "
                "are single-line visible ASCII (JSON-encode structured values)"
            )
    return dict(headers)


# --- a call's options (the old direct surface) ----------------------------------------------------


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InvalidParameterError(
            f"prompt must be a string (or pass messages=[...] or a dspy.lm15.Request), got {type(prompt).__name__}",
            parameter="prompt",
            expected="a string",
        )
    return prompt


def check_call_flag(name: str, value: Any) -> bool:
    """A True/False option of one call (``only_completed``, ``return_sorted``)."""
    if not isinstance(value, bool):
        raise InvalidParameterError(
            f"{name} must be True or False, got {type(value).__name__} {value!r}", parameter=name, expected="a bool"
        )
    return value


# --- limits ----------------------------------------------------------------------------------------


def check_optional_count(name: str, value: Any) -> None:
    """A limit counted in whole things (requests): a positive int, or None for off."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


def check_optional_amount(name: str, value: Any, unit: str) -> None:
    """A limit measured in ``unit`` (USD, requests per minute): a positive finite number, or None for off."""
    if value is not None and (not is_number(value) or value <= 0):
        raise ConfigurationError(f"{name} must be a positive number of {unit} or None, got {value!r}")


def check_limits_fit(*, named: str, budget: bool, token_rate: bool, model: str, priced: bool, max_tokens: Any) -> None:
    """What a budget (``budget``: one is set) or a token rate (``token_rate``) needs to know a request's
    worst case: prices for the model (``priced``), and ``max_tokens``. ``named`` names the limits set."""
    if budget and not priced:
        raise ConfigurationError(
            f"budget_usd needs prices to know what a request can cost, and {model!r} has none (it is not in the "
            "built-in catalogue): build the lm with prices={'input': ..., 'output': ...} (USD per million tokens)"
        )
    if (budget or token_rate) and max_tokens is None:
        raise ConfigurationError(
            f"{named}: a budget and a token rate reserve each request's worst case, prompt + max_tokens, and this "
            "lm has max_tokens=None: build it with max_tokens set"
        )


class _JobLimits(Protocol):
    """What :func:`check_job_limits` reads of a ``Limits`` (named here: this module sits below ``limits/``)."""

    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def tokens_per_minute(self) -> float | None: ...
    @property
    def budget_usd(self) -> float | None: ...
    @property
    def enabled(self) -> bool: ...
    def as_kwargs(self) -> dict[str, Any]: ...


_L = TypeVar("_L", bound=_JobLimits)


def check_job_limits(
    limits: _L,
    *,
    lm: Any,
    where: str,
    sizes: tuple[int, int],
    existing: Any = None,
    owner: str = "the lm",
    hint: str = "",
) -> _L | None:
    """A Ray job's ``Limits``, or None when none is set, checked against the ``Anyscale`` LM whose
    requests they will hold.

    ``where`` names the call in messages; ``sizes`` is (concurrency, threads_per_actor), for the
    message refusing ``max_concurrency``; ``existing`` is a limiter (an ``AnyLimiter``) the requests
    already count against, ``owner`` says whose, and ``hint`` how to set the limits in one place.
    """
    if limits.max_concurrency is not None:
        concurrency, threads = sizes
        raise ConfigurationError(
            f"max_concurrency={limits.max_concurrency}: {where} cannot hold it. A concurrency limit holds in one "
            f"process, and a job runs in many: its requests in flight are at most concurrency x threads_per_actor "
            f"({concurrency} x {threads} = {concurrency * threads} here), so choose those two, with a product of at "
            f"most {limits.max_concurrency}. (An lm built with max_concurrency=N keeps N in each worker.)"
        )
    if not limits.enabled:
        return None
    named = ", ".join(limits.as_kwargs())
    if existing is not None and existing.enabled:
        raise ConfigurationError(
            f"{named}: {where} cannot have limits of its own here: its requests already count against {owner}'s "
            f"({existing.limits.describe()}), and a request counts against one ledger. Set the limits in one "
            f"place: {hint}"
        )
    for leaf in _leaf_lms(lm):  # a Router's limits are sent by its members: each must give what they need
        check_lm_fits(limits, leaf, named=named)
    return limits


def check_lm_fits(limits: Any, lm: Any, *, named: str) -> None:
    """``check_limits_fit`` for one ``Anyscale`` LM that will send requests under ``limits``."""
    check_limits_fit(
        named=named,
        budget=limits.budget_usd is not None,
        token_rate=limits.tokens_per_minute is not None,
        model=lm.model,
        priced=lm.engine.prices is not None,
        max_tokens=lm.kwargs.get("max_tokens"),
    )


def _leaf_lms(lm: Any) -> Iterator[Any]:
    """The ``Anyscale`` LMs that send ``lm``'s requests: itself, or a Router's members (read by their
    ``members``: this layer imports no LM class)."""
    members = getattr(lm, "members", None)
    if not isinstance(members, Mapping):
        yield lm
        return
    for member in members.values():
        yield from _leaf_lms(member)


# --- the Ray entry points -----------------------------------------------------------------------------


def check_program(program: Any) -> None:
    if not isinstance(program, dspy.Module):
        expected = "a dspy.Module (dspy.Predict(...), dspy.ChainOfThought(...), your own Module)"
        fail("program", expected, program, show=False)


def check_lm(lm: Any, anyscale: type[Any] | tuple[type[Any], ...]) -> None:
    """``lm`` must be an ``Anyscale`` or a ``Router`` (``anyscale``: the classes, given by the Ray entry points).

    A Router's members may not have limits of their own beyond ``max_concurrency``: each worker rebuilds
    them from ``lm.dump_state()``, and would start a fresh ledger of its own for each (a budget per worker).
    """
    if not isinstance(lm, anyscale):
        expected = "a dspy_anyscale.Anyscale or Router (each worker rebuilds it from lm.dump_state())"
        fail("lm", expected, lm, show=False)
    if getattr(lm, "members", None) is None:
        return
    for leaf in _leaf_lms(lm):
        limits = leaf.limiter.limits
        if limits.enabled and set(limits.as_kwargs()) != {"max_concurrency"}:
            raise ConfigurationError(
                f"lm: the Router's member {leaf!r} has limits of its own ({limits.describe()}), which a Ray job "
                "cannot share: each worker would rebuild the member with a fresh ledger. Set them on the Router "
                "(Router(..., budget_usd=...): one ledger for the job) or pass limits=Limits(...) to the run"
            )


def check_adapter(adapter: Any) -> None:
    if adapter is not None and not isinstance(adapter, dspy.Adapter):
        fail("adapter", "None or a dspy.Adapter, such as dspy.JSONAdapter()", adapter, show=False)


def check_metric(metric: Any, *, optional: bool) -> None:
    if not callable(metric) and not (optional and metric is None):
        expected = f"{'None or ' if optional else ''}a callable metric(example, prediction, trace=None)"
        fail("metric", expected, metric, show=False)


def check_run_sizes(*, concurrency: Any, threads_per_actor: Any, num_cpus: Any) -> None:
    """A run's actor pool: each None (the default, or the pool's) or a value."""
    ints = {"concurrency": concurrency, "threads_per_actor": threads_per_actor}
    check_positive_ints(**{name: value for name, value in ints.items() if value is not None})
    if num_cpus is not None:
        check_positive_number("num_cpus", num_cpus)


def check_run_arguments(
    program: Any,
    *,
    lm: Any,
    adapter: Any,
    pool: Any,
    sizes: Mapping[str, Any],
    batch_size: Any,
    materialize: Any,
    metric: Any,
    failure_score: Any,
    anyscale: type[Any] | tuple[type[Any], ...],
    pool_type: type[Any],
) -> None:
    """``run_program`` / ``evaluate``'s arguments. ``sizes``: concurrency, threads_per_actor and num_cpus;
    ``anyscale`` and ``pool_type``: the ``Anyscale`` and ``ProgramPool`` classes."""
    check_program(program)
    check_adapter(adapter)
    check_positive_ints(batch_size=batch_size)
    check_run_sizes(**sizes)
    check_flag("materialize", materialize)
    check_metric(metric, optional=True)
    if not is_number(failure_score):
        fail("failure_score", "a number (the score of a row whose program raised)", failure_score, show=False)
    if pool is None:
        check_lm(lm, anyscale)
        return
    if not isinstance(pool, pool_type):
        fail("pool", "a ProgramPool (or None)", pool, show=False)
    check_run_on_pool(pool, lm, adapter, sizes)


def check_run_on_pool(pool: Any, lm: Any, adapter: Any, sizes: Mapping[str, Any]) -> None:
    """The rule for ``run_program(..., pool=pool)`` (a ``ProgramPool``): its LM, adapter and sizes, or nothing.

    Another LM is one whose saved state differs from the one the pool's workers were built from.
    """
    dump_state = getattr(lm, "dump_state", None)
    if lm is not None and lm is not pool.lm and (not callable(dump_state) or dump_state() != pool._lm_state):
        raise ConfigurationError(
            f"lm: this pool's workers run {pool.lm!r}; omit lm= with pool= (or pass that same LM). "
            "For another LM, start another ProgramPool(lm=...)."
        )
    if adapter is not None and not _same_adapter(adapter, pool.adapter):
        raise ConfigurationError(
            f"adapter: this pool's workers use {pool.adapter!r}; omit adapter= with pool= (or pass that same "
            "adapter). For another adapter, start another ProgramPool(adapter=...)."
        )
    for name, value in sizes.items():
        if value is not None and value != getattr(pool, name):
            raise ConfigurationError(
                f"{name}={value!r}: with pool= the pool's {name}={getattr(pool, name)!r} applies; omit it"
            )


def _same_adapter(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and vars(a) == vars(b))


def check_pool_arguments(
    *,
    lm: Any,
    adapter: Any,
    concurrency: Any,
    threads_per_actor: Any,
    num_cpus: Any,
    max_restarts: Any,
    start_timeout: Any,
    anyscale: type[Any] | tuple[type[Any], ...],
) -> None:
    """``ProgramPool``'s arguments (``anyscale``: the ``Anyscale`` class)."""
    check_lm(lm, anyscale)
    check_adapter(adapter)
    check_positive_ints(concurrency=concurrency, threads_per_actor=threads_per_actor)
    check_positive_number("num_cpus", num_cpus)
    check_positive_number("start_timeout", start_timeout)
    if not _is_int(max_restarts) or max_restarts < 0:
        fail("max_restarts", "an int >= 0", max_restarts, show=False)


def check_run_options(options: Mapping[str, Any], known: Iterable[str], *, where: str) -> None:
    """Keywords passed on to another entry point (``evaluate``'s ``**run_options``): a name it does not take
    is Python's TypeError, naming the ones it does."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}; run_program's are {sorted(known)}")


def check_input_keys(keys: Any, columns: Iterable[str] | None) -> list[str]:
    """The program's input columns: a non-empty list of names, each a column of the data (when known)."""
    if (
        isinstance(keys, str | bytes)
        or not isinstance(keys, Sequence)
        or not keys
        or not all(isinstance(key, str) and key for key in keys)
    ):
        fail("input_keys", "a non-empty list of column names, such as ['question']", keys)
    if columns is not None:
        known = set(columns)
        missing = [key for key in keys if key not in known]
        if missing:
            raise ConfigurationError(
                f"input_keys names {', '.join(map(repr, missing))}, not a column of the dataset "
                f"(its columns: {', '.join(map(repr, sorted(known)))})"
            )
    return list(keys)


def require_input_keys() -> NoReturn:
    raise ConfigurationError(
        "pass input_keys=[...]: which columns are the program's inputs (the rest, such as gold labels "
        "for a metric, are carried through)"
    )


def check_dataset_items(dataset: Any) -> list[Any]:
    """The rows of an in-memory dataset (an iterable of dicts or ``dspy.Example``), read once."""
    expected = "a ray.data.Dataset or an iterable (list, generator) of dicts or dspy.Example"
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a DataFrame iterates over its column names
        fail("dataset", f"{expected} (for a pandas DataFrame: ray.data.from_pandas(df))", dataset, show=False)
    if isinstance(dataset, str | bytes | Mapping | dspy.Example) or not isinstance(dataset, Iterable):
        fail("dataset", expected, dataset, show=False)
    items = list(dataset)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping | dspy.Example):
            fail(f"dataset[{index}]", "a dict or a dspy.Example", item, show=False)
    return items


def check_run_results(results: Any, seconds: Any, columns: Sequence[str], *, dataset_type: type[Any]) -> None:
    """``summarize_run``'s arguments: a dataset (``dataset_type``: Ray's ``Dataset``) that a run returned,
    its known columns checked, and seconds or None."""
    if not isinstance(results, dataset_type):
        fail("results", "the ray.data.Dataset that run_program or evaluate returned", results, show=False)
    if seconds is not None and (not is_number(seconds) or seconds < 0):
        fail("seconds", "None or a number of seconds >= 0", seconds, show=False)
    known = results.columns(fetch_if_missing=False)  # a lazy dataset's columns are checked as it runs
    missing = [name for name in columns if known is not None and name not in known]
    if missing:
        raise ConfigurationError(
            f"results must come from run_program or evaluate: it has no {', '.join(missing)} column(s)"
        )


# --- long runs: output, resume, progress (dspy_anyscale.run_program / evaluate, and the Ray ones) ------


def check_output(output: object, filesystem: object) -> str:
    """Where a run writes its rows; its kind: ``"jsonl"`` (a ``.jsonl`` / ``.ndjson`` file on this
    machine), ``"parquet_file"`` (a ``.parquet`` file) or ``"parquet_dir"`` (a path without a suffix,
    or ending in ``/``: a directory of Parquet parts), on the local disk, a URI pyarrow opens
    (``s3://``, ``gs://``, ``hdfs://``, ...) or ``filesystem`` (a pyarrow or fsspec filesystem)."""
    if not isinstance(output, str | os.PathLike):
        fail("output", "a path or URI (str or os.PathLike) such as 'results.jsonl' or 's3://bucket/run/'", output)
    text = os.fspath(output)
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        fail("output", "a non-empty path or URI", output)
    if filesystem is not None and not _is_filesystem(filesystem):
        fail("filesystem", "None, a pyarrow.fs.FileSystem or an fsspec filesystem", filesystem, show=False)
    name = text.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower() if not text.endswith("/") else ""
    if suffix in C.RUNS_JSONL_SUFFIXES:
        if filesystem is not None or ("://" in text and not text.startswith("file://")):
            raise ConfigurationError(
                f"output={text!r}: a JSONL output is appended and flushed row by row, which only a local file "
                "can do (an object store writes a file whole); for a remote filesystem write Parquet parts to "
                "a directory (output='s3://bucket/run/') or a .parquet file"
            )
        return "jsonl"
    if suffix == C.RUNS_PARQUET_SUFFIX:
        return "parquet_file"
    if suffix:
        raise ConfigurationError(
            f"output={text!r}: a run writes JSONL ({', '.join(C.RUNS_JSONL_SUFFIXES)}), a {C.RUNS_PARQUET_SUFFIX} "
            "file, or a directory of Parquet parts (a path without a suffix, or ending in '/'); "
            f"not {suffix!r}"
        )
    return "parquet_dir"


def _is_filesystem(value: object) -> bool:
    # Duck-typed, so that this module imports neither pyarrow nor fsspec: pyarrow's FileSystem opens
    # output streams, fsspec's AbstractFileSystem has a protocol and opens files.
    pyarrow_fs = callable(getattr(value, "open_output_stream", None))
    fsspec_fs = hasattr(value, "protocol") and callable(getattr(value, "open", None))
    return pyarrow_fs or fsspec_fs


def check_run_flags(*, output: object, resume: object, retry_errors: object, progress: object) -> None:
    """``resume`` and ``retry_errors`` continue an output, so they need one; ``progress`` is a flag,
    or ``"ray"`` (Ray Data's own bars and logs, for the Ray entry points)."""
    check_flag("resume", resume)
    check_flag("retry_errors", retry_errors)
    if progress != "ray":
        check_flag("progress", progress)
    if resume and output is None:
        raise ConfigurationError("resume=True continues an earlier run from its output: pass output=... too")
    if retry_errors and not resume:
        raise ConfigurationError(
            "retry_errors=True runs the error rows of an earlier run again: it needs resume=True (and its output=...)"
        )


def check_id_column(id_column: object, columns: Iterable[str] | None) -> str | None:
    """The column that identifies each row (None: a digest of the input fields), a column of the data."""
    if id_column is None:
        return None
    if not isinstance(id_column, str) or not id_column:
        fail("id_column", "None or a column name, such as 'id'", id_column)
    if columns is not None and id_column not in set(columns):
        raise ConfigurationError(f"id_column={id_column!r} is not a column of the data")
    return id_column


def check_no_row_id_column(columns: Iterable[str], id_column: str | None, row_id: str) -> None:
    """A column named like the one a run adds is the id, or a clash: say which to choose."""
    if id_column != row_id and row_id in set(columns):
        raise ConfigurationError(
            f"the data has a {row_id!r} column, the name of the column a run adds (each row's id): pass "
            f"id_column={row_id!r} to use it as the id, or rename it"
        )


def check_row_ids(ids: Sequence[str], values: Sequence[object], id_column: str) -> None:
    """Every row has an id, and no two rows share one: a resumed run matches its rows by it."""
    first: dict[str, int] = {}
    for index, (row_id, value) in enumerate(zip(ids, values, strict=True)):
        if value is None or row_id == "":
            raise ConfigurationError(f"id_column={id_column!r}: row {index} has no value; every row needs its id")
        if row_id in first:
            raise ConfigurationError(
                f"id_column={id_column!r}: rows {first[row_id]} and {index} share the id {row_id!r}; "
                "ids must be unique (or leave id_column=None: rows are then told apart by their inputs)"
            )
        first[row_id] = index


def check_num_threads(num_threads: object) -> int:
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        fail("num_threads", "a positive int", num_threads)
    return num_threads


def check_local_lm(lm: object) -> None:
    """A local run's LM: any DSPy LM (an ``Anyscale`` also prices each row and can take limits)."""
    if not isinstance(lm, dspy.BaseLM):
        fail("lm", "a dspy LM, such as dspy_anyscale.Anyscale(...) (or dspy.configure(lm=...) first)", lm, show=False)


def check_local_limits(limits: Any, lm: Any) -> Any:
    """A local run's ``Limits`` (None when none is set): held by a copy of ``lm`` with a ledger of its own
    for the run, so ``lm`` must be an ``Anyscale`` without limits of its own (one request, one ledger)."""
    if not limits.enabled:
        return None
    named = ", ".join(limits.as_kwargs())
    existing = getattr(lm, "limiter", None)
    if existing is None or not callable(getattr(lm, "copy", None)):
        raise ConfigurationError(f"{named}: limits for a run need a dspy_anyscale.Anyscale lm, got {type(lm).__name__}")
    if existing.enabled:
        raise ConfigurationError(
            f"{named}: this run cannot have limits of its own: its requests already count against the lm's "
            f"({existing.limits.describe()}), and a request counts against one ledger. Set the limits in one "
            "place: on the lm, or here with an lm without"
        )
    check_limits_fit(
        named=named,
        budget=limits.budget_usd is not None,
        token_rate=limits.tokens_per_minute is not None,
        model=lm.model,
        priced=lm.engine.prices is not None,
        max_tokens=lm.kwargs.get("max_tokens"),
    )
    return limits
