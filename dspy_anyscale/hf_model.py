"""``HFModel``: the dspy-ai 2.4 ``HFModel`` surface on a real DSPy 3.4 LM driven by an engine.

Everything runs through DSPy's own call path, so its cache, retries with backoff, ``n``
fan-out, history, usage tracking and callbacks apply to direct prompts as much as to programs.
``forward``/``aforward`` stay DSPy's own (a custom ``forward`` is deprecated and loses all of the
above); they only get the cache identity added, like every other entry point (see ``_KeyedEntryPoint``).

Three ways in:

* ``lm("prompt")`` / ``lm._generate("prompt")`` / ``lm.request(...)``: the old direct surface,
  returning ``list[str]`` / ``{"prompt", "choices": [{"text", ...}]}``;
* ``lm(messages=[...])``: what DSPy's adapters do, returning DSPy's outputs;
* ``lm(dspy.lm15.Request(...))``: returns a ``dspy.lm15.Response``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, aclosing, contextmanager, nullcontext
from dataclasses import replace
from types import MethodType
from typing import TYPE_CHECKING, Any, NoReturn

import dspy

from . import _constants as C
from ._direct_stream import astream_text, stream_text
from ._identity import check_user_metadata, strip_identity_metadata, with_identity_metadata
from ._observe import (
    Call,
    Observer,
    call_answered,
    calling_module,
    current_call,
    current_route,
    finish_call,
    observed_call,
    open_call,
    within,
)
from ._params import DirectPlan, check_program_call_kwargs, plan_direct_call
from ._server_facts import history_facts
from ._validate import check_call_flag, check_prompt
from .errors import LMProviderError, UnsupportedParameterError, public_error

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import LM as DSPyLM
    from ._dspy_types import Request, Response, lm15
else:
    from dspy import LM as DSPyLM
    from dspy import lm15


def choice_from(response: Response, *, logprobs: bool) -> dict[str, Any]:
    """One ``choices`` entry of the old ``_generate`` format, from a canonical Response."""
    choice: dict[str, Any] = {"text": response.text or "", "finish_reason": response.finish_reason}
    thinking = [part.text for part in response.message.parts if part.type == "thinking"]
    if thinking:
        choice["reasoning_content"] = "".join(thinking)
    if logprobs:
        choice["logprobs"] = {
            "content": [
                {
                    "token": token.token,
                    "logprob": token.logprob,
                    "top_logprobs": [{"token": top.token, "logprob": top.logprob} for top in token.top],
                }
                for token in response.logprobs or ()
            ]
        }
    return choice


def select_choices(
    choices: Sequence[dict[str, Any]], only_completed: bool, return_sorted: bool
) -> list[dict[str, Any]]:
    """The old client's choice filtering: drop truncated choices (unless all are), sort by mean logprob."""
    selected = list(choices)
    if only_completed:
        selected = [choice for choice in selected if choice.get("finish_reason") != "length"] or selected
    if return_sorted:
        scores = [_mean_logprob(choice) for choice in selected]
        known = [score for score in scores if score is not None]
        if len(known) != len(scores):
            raise UnsupportedParameterError(
                "return_sorted=True needs token logprobs, and the server returned none", features=["return_sorted"]
            )
        selected = [choice for _, choice in sorted(zip(known, selected, strict=True), key=lambda pair: -pair[0])]
    return selected


def _mean_logprob(choice: Mapping[str, Any]) -> float | None:
    tokens = (choice.get("logprobs") or {}).get("content") or []
    return sum(token["logprob"] for token in tokens) / len(tokens) if tokens else None


def _is_program_call(prompt: Any, kwargs: Mapping[str, Any]) -> bool:
    """A DSPy-style call (``messages=`` or a ``Request``), which keeps DSPy's own semantics."""
    if isinstance(prompt, lm15.Request) or "messages" in kwargs or "request" in kwargs:
        check_program_call_kwargs({k: v for k, v in kwargs.items() if k not in ("messages", "request")})
        return True
    return False


def _raise_public(exc: BaseException, model: str) -> NoReturn:
    """Raise ``exc`` as users see it (see ``errors.RetryWaitTooLongError``)."""
    public = public_error(exc, model)
    if public is exc:
        raise exc
    raise public from exc.__cause__


def _end_stream(call: Call | None, exc: BaseException, model: str) -> NoReturn:
    """A stream ended by ``exc`` (``GeneratorExit`` when closed early): record it, then raise it."""
    finish_call(call, public_error(exc, model))
    _raise_public(exc, model)


def _request_with_identity(request: Request, identity: str) -> Request:
    """The Request with the cache identity in this package's ``config.extensions`` directive."""
    extensions = dict(request.config.extensions or {})
    check_user_metadata(extensions.get("metadata"))
    directive = extensions.get(C.ENGINE_EXTENSION_KEY)
    if directive is not None and not isinstance(directive, Mapping):
        return request  # malformed: the engine refuses it with the field's name
    extensions[C.ENGINE_EXTENSION_KEY] = {**(directive or {}), "identity": identity}
    return replace(request, config=replace(request.config, extensions=extensions))


def _sorting_options(only_completed: bool, return_sorted: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    check_call_flag("only_completed", only_completed)
    if not check_call_flag("return_sorted", return_sorted):
        return kwargs
    return {**kwargs, "logprobs": kwargs.get("logprobs") or True}  # sorting by likelihood needs the tokens' logprobs


def _texts(response: Mapping[str, Any], only_completed: bool, return_sorted: bool) -> list[str]:
    return [choice["text"] for choice in select_choices(response["choices"], only_completed, return_sorted)]


def _keyed_forward(self: HFModel, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
    """``dspy.LM.forward`` with the cache identity added: one observed call, errors as users see them."""
    with self._observed():
        prompt, kwargs = self._keyed(prompt, kwargs)
        return dspy.LM.forward(self, prompt, messages, **kwargs)


async def _keyed_aforward(self: HFModel, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
    """``dspy.LM.aforward`` with the cache identity added."""
    with self._observed():
        prompt, kwargs = self._keyed(prompt, kwargs)
        return await dspy.LM.aforward(self, prompt, messages, **kwargs)


class _KeyedEntryPoint:
    """``forward`` / ``aforward``: DSPy's own entry point, called with the cache identity added.

    They are public (DSPy's ``SandboxLM`` calls them), so they must key the cache like ``__call__``.
    DSPy 3.4 tells an engine LM from a deprecated custom-``forward`` one by comparing the class
    attribute with ``dspy.LM``'s (``execution.prepare``): read from the class, this answers with
    DSPy's own function, and that is truly what runs, through the engine, with DSPy's cache,
    retries and history. Read from an instance, it is that function with the identity put in the call.
    """

    def __init__(self, keyed: Callable[..., Any]) -> None:
        self._keyed = keyed
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return getattr(dspy.LM, self._name)
        return MethodType(self._keyed, instance)


class HFModel(DSPyLM):
    """The old ``HFModel`` interface (``kwargs``, ``history``, ``_generate``, ``basic_request``,
    ``request``, ``__call__(prompt, only_completed, return_sorted)``, ``inspect_history``) as a
    DSPy 3.4 ``dspy.LM`` that runs through ``engine`` / ``async_engine``."""

    def __init__(
        self,
        model: str,
        *,
        engine: Any,
        async_engine: Any = None,
        model_type: str = "chat",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_type=model_type, engine=engine, async_engine=async_engine, **kwargs)
        check_user_metadata(self.kwargs.get("metadata"))  # refused now, not at the first call

    forward = _KeyedEntryPoint(_keyed_forward)
    aforward = _KeyedEntryPoint(_keyed_aforward)

    # --- the old direct surface ----------------------------------------------------------------

    def __call__(
        self, prompt: Any = None, only_completed: bool = True, return_sorted: bool = False, **kwargs: Any
    ) -> Any:  # list[str] for a prompt; DSPy's outputs (a list, or a Response for a Request) otherwise
        """``lm("text")`` → ``list[str]`` (old surface); ``messages=`` or a ``Request`` → DSPy's call."""
        with self._observed():
            if _is_program_call(prompt, kwargs):
                prompt, kwargs = self._keyed(prompt, kwargs)
                with self._candidates(self._program_n(kwargs)):  # DSPy fans n out into n requests
                    return super().__call__(prompt, **kwargs)
            response = self.request(check_prompt(prompt), **_sorting_options(only_completed, return_sorted, kwargs))
            return _texts(response, only_completed, return_sorted)

    async def acall(
        self, prompt: Any = None, only_completed: bool = True, return_sorted: bool = False, **kwargs: Any
    ) -> Any:  # as __call__
        """Async twin of :meth:`__call__`, with the same three ways in."""
        with self._observed():
            if _is_program_call(prompt, kwargs):
                prompt, kwargs = self._keyed(prompt, kwargs)
                with self._candidates(self._program_n(kwargs)):
                    return await super().acall(prompt, **kwargs)
            response = await self._agenerate(
                check_prompt(prompt), **_sorting_options(only_completed, return_sorted, kwargs)
            )
            return _texts(response, only_completed, return_sorted)

    # --- cache identity ---------------------------------------------------------------------------

    def _cache_identity(self) -> str | None:
        """What besides the call decides the answer (a digest), or None. Subclasses with a server say."""
        return None

    def _endpoint_name(self) -> str | None:
        """The service this LM calls, as history entries name it (``host:port``), or None. Subclasses say."""
        return None

    def _adapter_name(self) -> str | None:
        """The LoRA adapter this LM is bound to, as history entries name it, or None. Subclasses say."""
        return None

    def _keyed(self, prompt: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """A program call with the cache identity where DSPy's cache key sees it: a Request's extensions,
        or the ``metadata`` kwarg of a messages call (the engine takes it off before the wire)."""
        identity = self._cache_identity()
        if identity is None:
            return prompt, kwargs
        if isinstance(prompt, lm15.Request):
            return _request_with_identity(prompt, identity), kwargs
        if isinstance(kwargs.get("request"), lm15.Request):
            return prompt, {**kwargs, "request": _request_with_identity(kwargs["request"], identity)}
        metadata = kwargs["metadata"] if "metadata" in kwargs else self.kwargs.get("metadata")
        return prompt, {**kwargs, "metadata": with_identity_metadata(metadata, identity)}

    def request(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        return self.basic_request(prompt, **kwargs)

    def basic_request(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        # DSPy records each call in self.history; nothing to add here.
        return self._generate(prompt, **kwargs)

    def _generate(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        """``{"prompt": prompt, "choices": [{"text", "finish_reason", ...}, ...]}``, one choice per ``n``."""
        with self._observed():
            plan = self._plan(kwargs)
            request = self._direct_request(check_prompt(prompt), plan)
            with self._candidates(plan.n):
                responses = [super(HFModel, self).__call__(request, **plan.candidate_kwargs(i)) for i in range(plan.n)]
            return {"prompt": prompt, "choices": [choice_from(r, logprobs=plan.logprobs) for r in responses]}

    async def _agenerate(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        """Async :meth:`_generate`; candidates are requested concurrently."""
        import asyncio

        with self._observed():
            plan = self._plan(kwargs)
            request = self._direct_request(check_prompt(prompt), plan)
            with self._candidates(plan.n):  # the gathered tasks inherit it
                responses = await asyncio.gather(
                    *(super(HFModel, self).acall(request, **plan.candidate_kwargs(i)) for i in range(plan.n))
                )
            return {"prompt": prompt, "choices": [choice_from(r, logprobs=plan.logprobs) for r in responses]}

    # --- n candidates: one call ----------------------------------------------------------------------

    def _candidates(self, n: int) -> AbstractContextManager[Any]:
        """A call of ``n`` requests: the LM's limits (a subclass's ``limiter``) reserve all of them at
        its first request, or refuse before any is sent, so no completion is paid for and dropped."""
        limiter = getattr(self, "limiter", None)
        return limiter.candidates(n) if limiter is not None and n > 1 else nullcontext()

    def _program_n(self, kwargs: Mapping[str, Any]) -> int:
        """How many requests DSPy makes for a program call (its ``n``; DSPy checks the value)."""
        n = kwargs["n"] if "n" in kwargs else self.kwargs.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Yield the completion's text as it arrives. Same options as ``_generate`` (one completion).

        It is an ordinary DSPy call underneath: retried if it fails before the first chunk, recorded
        in history and usage, and served whole from DSPy's cache when cached.
        """
        return self._stream(self._single_request(prompt, kwargs))  # options are checked now, not at first next()

    def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`: ``async for chunk in lm.astream("...")``."""
        return self._astream(self._single_request(prompt, kwargs))

    # A stream is a generator, abandoned or closed from anywhere: its call is current only inside the
    # task that runs the request (never in the consumer's context), and ends when the generator does.

    def _stream(self, request: Request) -> Iterator[str]:
        call = open_call(self._observers(), self.model, stream=True)
        try:
            yield from stream_text(lambda: self._streamed_call(call, request))
        except BaseException as exc:
            _end_stream(call, exc, self.model)
        finish_call(call)

    async def _astream(self, request: Request) -> AsyncIterator[str]:
        call = open_call(self._observers(), self.model, stream=True)
        try:
            # Closed with this generator, not whenever it is collected: the request stops first, then the call ends.
            async with aclosing(astream_text(lambda: self._streamed_call(call, request))) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException as exc:
            _end_stream(call, exc, self.model)
        finish_call(call)

    async def _streamed_call(self, call: Call | None, request: Request) -> Response:
        with within(call):
            response: Response = await super().acall(request)  # DSPy answers a Request with its Response
            return response

    # --- accounting --------------------------------------------------------------------------------

    @contextmanager
    def _observed(self) -> Iterator[None]:
        """One observed call per public call, however many HTTP attempts it takes; errors as users see them."""
        with observed_call(self._observers(), self.model):
            try:
                yield
            except LMProviderError as exc:  # the one internal error that surfaces as another class
                _raise_public(exc, self.model)

    def _observers(self) -> tuple[Observer, ...]:
        """Who hears of each call and attempt (usage records, tracing). Subclasses say."""
        return ()

    def _priced(self, usage: Mapping[str, Any]) -> tuple[float | None, dict[str, Any]] | None:
        """(cost, DSPy's ``cost_details``) of one history entry's usage, when the subclass has a price
        table; None leaves DSPy's own (which prices no custom engine)."""
        return None

    def update_history(self, entry: dict[str, Any]) -> None:
        """DSPy's history, with ``cost`` and ``cost_details`` from the price table (DSPy prices no custom engine),
        a program call's ``metadata`` as the caller gave it (without the cache identity), and ``endpoint``: which
        service answered (a Router's member name, else this LM's ``host:port``); ``module``: the DSPy module that
        made the call (None: a direct call); ``response_ids`` and ``rate_limit``: what the server said;
        ``adapter``: the LoRA adapter the LM is bound to (None: the base model)."""
        route = current_route()
        entry["endpoint"] = route.endpoint if route is not None else self._endpoint_name()
        entry["adapter"] = self._adapter_name()
        entry.update(history_facts(entry.get("response"), current_call(), calling_module()))
        kwargs = entry.get("kwargs")
        if isinstance(kwargs, dict) and "metadata" in kwargs:
            metadata = strip_identity_metadata(kwargs["metadata"])
            entry["kwargs"] = {key: value for key, value in kwargs.items() if key != "metadata"}
            if metadata is not None:
                entry["kwargs"]["metadata"] = metadata
        if entry.get("cost") is None:
            priced = self._priced(entry.get("usage") or {})
            if priced is not None:  # cost and cost_details from one table: they always agree
                entry["cost"], entry["cost_details"] = priced
        call_answered()  # inside DSPy's LM call, for a cache hit too: its span nests where a miss's does
        super().update_history(entry)
        if route is not None:
            route.entries.append(entry)  # the Router adds it to its own history once the call is answered

    def _single_request(self, prompt: str, kwargs: Mapping[str, Any]) -> Request:
        prompt = check_prompt(prompt)
        plan = self._plan(kwargs)
        if plan.n != 1 or plan.call_kwargs:
            raise UnsupportedParameterError(
                "a stream is one completion: n, cache and rollout_id do not apply", features=["n"]
            )
        return self._direct_request(prompt, plan)

    def _plan(self, kwargs: Mapping[str, Any]) -> DirectPlan:
        """Merge instance defaults with call options and sort them. Subclasses add wire extensions."""
        if not kwargs:
            # The common call has no options: reuse the plan while the defaults are unchanged.
            cached: tuple[dict[str, Any], DirectPlan] | None = self.__dict__.get("_default_plan")
            if cached is not None and cached[0] == self.kwargs:
                return cached[1]
        kwargs = dict(kwargs)
        extensions = self._direct_extensions(kwargs)  # takes the subclass's own keys out of kwargs
        options = {**self.kwargs, **kwargs}
        check_user_metadata(options.get("metadata"))
        plan = plan_direct_call(options, extensions)
        if not kwargs:
            self._default_plan = (dict(self.kwargs), plan)
        return plan

    def _direct_extensions(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _direct_request(self, prompt: str, plan: DirectPlan) -> Request:
        return plan.request(self.model, prompt)

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pools (DSPy treats a custom engine as borrowed; this LM owns it)."""
        super().close()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        await super().aclose()
        aclose = getattr(self._async_engine_spec, "aclose", None)
        if aclose is not None:
            await aclose()
