"""``dspy.lm15.Request`` ↔ the JSON of ``/chat/completions`` and ``/completions``. Pure: no I/O.

Every field of a Request is either written to the wire or refused with ``UnsupportedFeatureError``
naming the field; nothing is dropped. Options that steer this package rather than the server
(which endpoint to use, the cache identity) travel in ``Request.config.extensions["dspy_anyscale"]``
(or, from a program call, ``extensions["metadata"]["dspy_anyscale"]``), so they are part of DSPy's
cache key, and are taken off here: they are never sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson

from . import _constants as C
from ._identity import strip_identity_metadata
from ._params import SAMPLING_FIELDS
from ._text import preview
from .errors import UnexpectedResponseError

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import (
        Config,
        FinishReason,
        ImagePart,
        Message,
        Part,
        Request,
        Response,
        TextPart,
        TokenLogprob,
        Tool,
        ToolCallPart,
        ToolChoice,
        UnsupportedFeatureError,
        Usage,
        lm15,
    )
else:
    from dspy import lm15

EndpointKind = Literal["chat", "completions"]
ResponseFormatStyle = Literal["openai", "anyscale"]
# "auto": the OpenAI form until the server refuses it (see _dialects).
ConfiguredStyle = Literal["auto", "openai", "anyscale"]
ENDPOINT_PATHS: Mapping[EndpointKind, str] = MappingProxyType({"chat": C.CHAT_PATH, "completions": C.COMPLETIONS_PATH})

# Body keys an extension may never set: they carry the request's structure, owned by this module
# or by DSPy (n fan-out, streaming).
_STRUCTURAL_KEYS = frozenset({"model", "messages", "prompt", "stream", "stream_options", "n"})
_FINISH_REASONS: Mapping[str, FinishReason] = MappingProxyType(
    {
        "stop": "stop",
        "eos": "stop",
        "stop_sequence": "stop",
        "end_turn": "stop",
        "length": "length",
        "max_tokens": "length",
        "tool_calls": "tool_call",
        "function_call": "tool_call",
        "tool_call": "tool_call",
        "content_filter": "content_filter",
        "abort": "error",
        "error": "error",
    }
)


@dataclass(frozen=True)
class WireOptions:
    """How one ``Anyscale`` instance speaks to its server; fixed at construction."""

    endpoint: EndpointKind = "chat"
    system_prompt: str | None = None
    prompt_template: str | None = None
    # Provider-specific body keys given to the constructor (repetition_penalty, min_p, ...).
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    response_format_style: ConfiguredStyle = "auto"
    supports_tools: bool = True
    supports_response_schema: bool = True
    # The LoRA adapter this instance is bound to: a label for the cache identity, usage and spans,
    # never sent by itself (a server selects adapters by the model name or a body key, set apart).
    adapter: str | None = None

    def __post_init__(self) -> None:
        # A private copy: the caller's dict may change later. (Not a MappingProxyType: options pickle.)
        object.__setattr__(self, "extra_body", dict(self.extra_body))


@dataclass(frozen=True)
class WireCall:
    """One HTTP request to make: which endpoint, its path, and the JSON body."""

    endpoint: EndpointKind
    path: str
    payload: dict[str, Any]


def unsupported(message: str, feature: str) -> UnsupportedFeatureError:
    return lm15.UnsupportedFeatureError(message, feature=feature, provider=C.PROVIDER)


# --- Request → wire ----------------------------------------------------------------------------


def build_call(
    request: Request, options: WireOptions, *, stream: bool = False, style: ResponseFormatStyle = "openai"
) -> WireCall:
    """The HTTP call that carries ``request``, or ``UnsupportedFeatureError`` for what cannot be carried.

    ``style`` is the JSON-mode spelling to send (the engine decides it from the configured style and
    what the server is known to take).
    """
    extensions = dict(request.config.extensions or {})
    endpoint = _endpoint_directive(extensions.pop(C.ENGINE_EXTENSION_KEY, None), options.endpoint)
    _take_identity_off(extensions)
    if endpoint == "chat":
        payload: dict[str, Any] = {"model": request.model, "messages": chat_messages(request, options)}
        payload.update(_chat_only_fields(request, options, style))
    else:
        payload = {"model": request.model, "prompt": completions_prompt(request, options)}
        payload.update(_completions_only_fields(request))
    payload.update(_common_fields(request.config))
    _merge_extensions(payload, {**options.extra_body, **extensions})
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return WireCall(endpoint, ENDPOINT_PATHS[endpoint], payload)


_DIRECTIVE_KEYS = frozenset({"endpoint", "identity"})


def _endpoint_directive(directive: Any, default: EndpointKind) -> EndpointKind:
    if directive is None:
        return default
    endpoint = directive.get("endpoint", default) if isinstance(directive, Mapping) else None
    unknown = set(directive) - _DIRECTIVE_KEYS if isinstance(directive, Mapping) else set()
    if endpoint not in ENDPOINT_PATHS or unknown:
        raise unsupported(
            f'config.extensions["{C.ENGINE_EXTENSION_KEY}"] takes {{"endpoint": "chat" | "completions"}}, '
            f"got {directive!r}",
            f"config.extensions.{C.ENGINE_EXTENSION_KEY}",
        )
    return cast(EndpointKind, endpoint)  # one of ENDPOINT_PATHS, checked just above


def _take_identity_off(extensions: dict[str, Any]) -> None:
    """A program call's cache identity rides in ``metadata``; the server gets the user's metadata only."""
    if "metadata" not in extensions:
        return
    metadata = strip_identity_metadata(extensions["metadata"])
    if metadata is None:
        del extensions["metadata"]
    else:
        extensions["metadata"] = metadata


def _common_fields(config: Config) -> dict[str, Any]:
    body: dict[str, Any] = {
        name: getattr(config, name) for name in SAMPLING_FIELDS if getattr(config, name) is not None
    }
    if config.stop:
        body["stop"] = list(config.stop)
    if config.user_id is not None:
        body["user"] = config.user_id
    for name, why in (
        ("service_tier", "service tiers are an OpenAI/Anthropic billing feature"),
        ("store", "response storage is an OpenAI feature"),
        ("cache", "provider-side prompt caching is not configurable here (vLLM caches prefixes automatically)"),
        ("probabilities", "judgment probabilities need token scoring this client does not implement"),
    ):
        if getattr(config, name) is not None:
            raise unsupported(f"config.{name} is not supported by Anyscale-style endpoints: {why}", f"config.{name}")
    return body


def _chat_only_fields(request: Request, options: WireOptions, style: ResponseFormatStyle) -> dict[str, Any]:
    config = request.config
    body: dict[str, Any] = {}
    if config.logprobs is not None:
        body["logprobs"] = True
        if config.logprobs > 0:
            body["top_logprobs"] = config.logprobs
    if config.response_format is not None:
        body["response_format"] = _response_format(config.response_format, options, style)
    if request.tools:
        body["tools"] = [_tool(tool, index, options) for index, tool in enumerate(request.tools)]
    if config.tool_choice is not None:
        body.update(_tool_choice(config.tool_choice))
    if config.reasoning is not None:
        reasoning = config.reasoning
        if reasoning.thinking_budget is not None or reasoning.summary is not None:
            raise unsupported(
                "config.reasoning: OpenAI-compatible servers take only reasoning_effort; "
                "thinking_budget and summary have no wire field",
                "config.reasoning",
            )
        body["reasoning_effort"] = reasoning.effort
    return body


def _completions_only_fields(request: Request) -> dict[str, Any]:
    config = request.config
    for present, name, why in (
        (bool(request.tools), "tools", "tools need the chat endpoint"),
        (config.tool_choice is not None, "config.tool_choice", "tools need the chat endpoint"),
        (config.response_format is not None, "config.response_format", "JSON mode needs the chat endpoint"),
        (config.reasoning is not None, "config.reasoning", "reasoning effort needs the chat endpoint"),
    ):
        if present:
            raise unsupported(
                f"{name} cannot be carried by /completions: {why}. Use use_chat_api=True "
                '(or config.extensions={"dspy_anyscale": {"endpoint": "chat"}}).',
                name,
            )
    return {"logprobs": config.logprobs} if config.logprobs is not None else {}


def _response_format(spec: Mapping[str, Any], options: WireOptions, style: ResponseFormatStyle) -> dict[str, Any]:
    if spec["type"] == "json_object":
        return {"type": "json_object"}
    if not options.supports_response_schema:
        raise unsupported(
            "config.response_format json_schema: this Anyscale instance was built with supports_response_schema=False",
            "config.response_format",
        )
    if style == "anyscale":
        # Anyscale Endpoints' own spelling: JSON mode constrained by a schema.
        return {"type": "json_object", "schema": spec["schema"]}
    schema: dict[str, Any] = {"name": spec.get("name") or "response", "schema": spec["schema"]}
    if "strict" in spec:
        schema["strict"] = spec["strict"]
    return {"type": "json_schema", "json_schema": schema}


def _tool(tool: Tool, index: int, options: WireOptions) -> dict[str, Any]:
    if not options.supports_tools:
        raise unsupported("tools: this Anyscale instance was built with supports_tools=False", f"tools[{index}]")
    if not isinstance(tool, lm15.FunctionTool):
        raise unsupported(
            f"tools[{index}] {tool.name!r} is a provider built-in tool; OpenAI-compatible servers run function "
            "tools only",
            f"tools[{index}]",
        )
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if choice.mode == "none":
        body["tool_choice"] = "none"
    elif len(choice.allowed) == 1 and choice.mode == "required":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.allowed[0]}}
    elif choice.allowed:
        raise unsupported(
            "config.tool_choice: restricting the model to a subset of tools has no OpenAI-compatible "
            "spelling on these servers; pass only the allowed tools, or force one with mode='required'",
            "config.tool_choice.allowed",
        )
    else:
        body["tool_choice"] = choice.mode
    if choice.parallel is not None:
        body["parallel_tool_calls"] = choice.parallel
    return body


def _merge_extensions(payload: dict[str, Any], extensions: Mapping[str, Any]) -> None:
    for key, value in extensions.items():
        if key in _STRUCTURAL_KEYS:
            raise unsupported(
                f"config.extensions[{key!r}] would overwrite the request's {key}", f"config.extensions.{key}"
            )
        if key in payload:
            raise unsupported(
                f"config.extensions[{key!r}] duplicates a field already set from the typed config; set it once",
                f"config.extensions.{key}",
            )
        payload[key] = value


def system_text(request: Request, options: WireOptions) -> str | None:
    """The one system message: the instance's system_prompt, then the request's own system text."""
    own: str | None
    if request.system is None or isinstance(request.system, str):
        own = request.system
    else:
        own = "".join(_text_of(part, "system") for part in request.system)
    texts = [text for text in (options.system_prompt, own) if text]
    return "\n\n".join(texts) if texts else None


def chat_messages(request: Request, options: WireOptions) -> list[dict[str, Any]]:
    system = system_text(request, options)
    rows: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    for index, message in enumerate(request.messages):
        rows.extend(_chat_rows(message, index))
    return rows


def _chat_rows(message: Message, index: int) -> list[dict[str, Any]]:
    where = f"messages[{index}]"
    if message.role == "user":
        return [{"role": "user", "content": _user_content(message.parts, where)}]
    if message.role == "assistant":
        return [_assistant_row(message.parts, where)]
    if message.role == "tool":
        return [_tool_row(part, f"{where}.parts[{i}]") for i, part in enumerate(message.parts)]
    raise unsupported(
        f"{where} is a second system/developer message; Anyscale-style servers accept only one system "
        'message ("Only one system message can be specified"). Put all instructions in the first.',
        where,
    )


def _user_content(parts: tuple[Part, ...], where: str) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and isinstance(parts[0], lm15.TextPart):
        return parts[0].text
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        if isinstance(part, lm15.TextPart):
            blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, lm15.ImagePart):
            blocks.append(_image_block(part, f"{where}.parts[{i}]"))
        else:
            raise unsupported(
                f"{where}.parts[{i}]: {part.type} input is not supported; send text or images", f"{where}.parts[{i}]"
            )
    return blocks


def _image_block(part: ImagePart, where: str) -> dict[str, Any]:
    if part.url is not None:
        url = part.url
    elif part.data is not None:
        url = f"data:{part.media_type};base64,{part.data}"
    else:
        raise unsupported(f"{where}: an image must be given by url or data (file ids are OpenAI-only)", where)
    image: dict[str, Any] = {"url": url}
    if part.detail is not None:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _assistant_row(parts: tuple[Part, ...], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        if isinstance(part, lm15.TextPart):
            texts.append(part.text)
        elif isinstance(part, lm15.ToolCallPart):
            calls.append(
                {
                    "id": part.id,
                    "type": "function",
                    "function": {"name": part.name, "arguments": json.dumps(part.input, ensure_ascii=False)},
                }
            )
        else:
            raise unsupported(
                f"{where}.parts[{i}]: an earlier assistant {part.type} part cannot be replayed", f"{where}.parts[{i}]"
            )
    row: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        row["tool_calls"] = calls
    return row


def _tool_row(part: Part, where: str) -> dict[str, Any]:
    if not isinstance(part, lm15.ToolResultPart):
        raise unsupported(f"{where}: a tool message holds tool results only", where)
    content = "".join(_text_of(item, f"{where}.content") for item in part.content)
    return {"role": "tool", "tool_call_id": part.id, "content": content}


def _text_of(part: Part, where: str) -> str:
    if isinstance(part, lm15.TextPart):
        return part.text
    raise unsupported(f"{where}: only text is supported here, got {part.type}", where)


def completions_prompt(request: Request, options: WireOptions) -> str:
    """One prompt for /completions: system text and each turn, separated by blank lines.

    A request of a single user message and no system text is sent as given (then templated).
    """
    blocks = [text for text in (system_text(request, options),) if text]
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        if message.role not in ("user", "assistant"):
            raise unsupported(f"{where}: {message.role} messages need the chat endpoint", where)
        blocks.append("".join(_text_of(part, f"{where}.parts[{i}]") for i, part in enumerate(message.parts)))
    prompt = "\n\n".join(blocks)
    if options.prompt_template:
        prompt = options.prompt_template.replace("{prompt}", prompt)
    return prompt


# --- wire → Response ---------------------------------------------------------------------------


def parse_response(data: dict[str, Any], call: WireCall, request: Request, *, url: str, status: int = 200) -> Response:
    """The canonical Response for a 2xx body, or ``UnexpectedResponseError`` naming what came back."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _unexpected(data, url, status, "Expected a non-empty 'choices' list")
    try:
        if call.endpoint == "chat":
            return _chat_response(data, choices[0], request)
        return _completions_response(data, choices[0], request)
    except (TypeError, ValueError, KeyError) as exc:
        raise _unexpected(data, url, status, f"Malformed response ({type(exc).__name__}: {exc})") from exc


def _unexpected(data: Any, url: str, status: int, why: str) -> UnexpectedResponseError:
    return UnexpectedResponseError(
        f"{why} from POST {url} (HTTP {status}); the server sent: {preview(orjson.dumps(data))}",
        provider=C.PROVIDER,
        status=status,
    )


def finish_reason(raw: Any) -> FinishReason:
    return _FINISH_REASONS.get(str(raw), "stop") if raw else "stop"


def _token_count(value: Any) -> int | None:
    """A count as servers send it; a string, a negative or a fraction is not one (unknown, not an error)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_from(data: Mapping[str, Any] | None) -> Usage:
    """The usage block of an answer; what is missing or malformed is unknown, and never fails the answer."""
    if not isinstance(data, Mapping):
        return lm15.Usage()
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return lm15.Usage(
        input_tokens=_token_count(data.get("prompt_tokens")),
        output_tokens=_token_count(data.get("completion_tokens")),
        total_tokens=_token_count(data.get("total_tokens")),
        cache_read_tokens=_token_count(cached),
    )


def _chat_response(data: dict[str, Any], choice: dict[str, Any], request: Request) -> Response:
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise ValueError("choices[0].message is missing")
    parts: list[Part] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        parts.append(lm15.ThinkingPart(str(reasoning)))
    parts.extend(_content_parts(message.get("content")))
    if message.get("refusal"):
        parts.append(lm15.RefusalPart(str(message["refusal"])))
    calls = [_tool_call(call, index) for index, call in enumerate(message.get("tool_calls") or ())]
    parts.extend(calls)
    return lm15.Response(
        id=str(data["id"]) if data.get("id") else None,
        model=str(data.get("model") or request.model),
        message=lm15.Message(role="assistant", parts=tuple(parts) or (lm15.TextPart(""),)),
        finish_reason="tool_call" if calls else finish_reason(choice.get("finish_reason")),
        usage=usage_from(data.get("usage")),
        logprobs=chat_logprobs(choice.get("logprobs")),
        provider_data=data,
    )


def _content_parts(content: Any) -> list[TextPart]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [lm15.TextPart(content)]
    if isinstance(content, list):
        # Text blocks are one text, joined as they are (lm15 would put a newline between two parts).
        texts = []
        for index, block in enumerate(content):
            if not isinstance(block, Mapping) or block.get("type", "text") != "text":
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                raise ValueError(f"message.content[{index}] is a {kind!r} block; only text blocks are read")
            texts.append(str(block.get("text", "")))
        return [lm15.TextPart("".join(texts))] if any(texts) else []
    raise ValueError(f"message.content is a {type(content).__name__}")


def _tool_call(call: Any, index: int) -> ToolCallPart:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not function.get("name"):
        raise ValueError(f"tool_calls[{index}] has no function name")
    return lm15.ToolCallPart(
        id=str(call.get("id") or f"call_{index}"),
        name=str(function["name"]),
        input=tool_arguments(function.get("arguments")),
    )


def tool_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as a JSON object. Like lm15's own reader, text that is not JSON (small
    models do this) is kept as ``{"partial_json": text}`` rather than failing the whole call."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return {"partial_json": str(arguments)}
    return value if isinstance(value, dict) else {"value": value}


def _completions_response(data: dict[str, Any], choice: dict[str, Any], request: Request) -> Response:
    text = choice.get("text")
    if not isinstance(text, str):
        raise ValueError("choices[0].text is not a string")
    return lm15.Response(
        id=str(data["id"]) if data.get("id") else None,
        model=str(data.get("model") or request.model),
        message=lm15.Message.assistant([lm15.TextPart(text)]),
        finish_reason=finish_reason(choice.get("finish_reason")),
        usage=usage_from(data.get("usage")),
        logprobs=completions_logprobs(choice.get("logprobs")),
        provider_data=data,
    )


def chat_logprobs(payload: Any) -> tuple[TokenLogprob, ...] | None:
    """The chat shape ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    entries = payload.get("content") if isinstance(payload, Mapping) else None
    if not isinstance(entries, list):
        return None
    out = []
    for entry in entries:
        if isinstance(entry, Mapping) and "token" in entry and entry.get("logprob") is not None:
            top = tuple(
                lm15.TopLogprob(str(alt["token"]), float(alt["logprob"]), _bytes(alt.get("bytes")))
                for alt in entry.get("top_logprobs") or ()
                if isinstance(alt, Mapping) and "token" in alt and alt.get("logprob") is not None
            )
            out.append(
                lm15.TokenLogprob(str(entry["token"]), float(entry["logprob"]), _bytes(entry.get("bytes")), top=top)
            )
    return tuple(out) if out else None


def _bytes(value: Any) -> tuple[int, ...] | None:
    return tuple(value) if isinstance(value, list) else None


def completions_logprobs(payload: Any) -> tuple[TokenLogprob, ...] | None:
    """The legacy completions shape ``{tokens, token_logprobs, top_logprobs: [{token: lp}]}``, or the
    chat shape ``{"content": [...]}`` that llama.cpp's server also uses on /completions."""
    if not isinstance(payload, Mapping):
        return None
    if isinstance(payload.get("content"), list):
        return chat_logprobs(payload)
    tokens = payload.get("tokens") or []
    values = payload.get("token_logprobs") or []
    tops = payload.get("top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        if value is None:
            continue
        alternatives = tuple(lm15.TopLogprob(str(t), float(lp)) for t, lp in (top or {}).items() if lp is not None)
        out.append(lm15.TokenLogprob(token=str(token), logprob=float(value), top=alternatives))
    return tuple(out) if out else None
