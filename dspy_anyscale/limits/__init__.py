"""Client-side limits for one LM: concurrency, request and token rates, a shared 429 cool-down,
and hard caps on spend and on requests, with one ledger shared by all copies of the LM.

    from dspy_anyscale.limits import Estimate, Limiter, Limits

    limiter = Limiter(Limits(max_concurrency=8, requests_per_minute=600, budget_usd=5.0))
    with limiter.acquire(Estimate(prompt_tokens=900, max_tokens=256, prices=prices)) as permit:
        ...                                   # send the request
        permit.settle(prompt_tokens=812, completion_tokens=97)
    print(limiter.report())

Semantics, in the order a request meets them:

1. **Queue.** Callers wait in one first-in-first-out queue, threads and asyncio tasks alike. The
   head waits for a free slot (``max_concurrency``), then for the ledger to admit it; nobody
   overtakes it, so a big request is never starved by small ones. A cancelled task, or a sync
   caller whose ``timeout`` passes, leaves the queue holding nothing. Nothing waits forever: a
   sync caller on an event loop's thread that would wait for that loop's own tasks is refused at
   once (``LimiterDeadlockError``), and tasks of a loop that is not running neither hold the
   queue nor keep their slots counted until it runs again (``_gate``).
2. **Caps** (``budget_usd``, ``max_requests``). The request's worst case (a true upper bound of
   its prompt tokens x input price + max_tokens x output price) is refused with
   ``BudgetExceededError`` if spent + reserved + worst case would exceed the budget; nothing is
   sent, and DSPy does not retry it. Money is counted in integer pico-USD, so the check is
   exact. A call of n requests (``with limiter.candidates(n)``) reserves all n at its first
   request, or none.
3. **Cool-down.** After ``note_rate_limited(seconds)`` (a 429's Retry-After) nobody is admitted
   until it has passed: one 429 pauses every caller, not just the one that got it.
4. **Rate buckets** (``requests_per_minute``, ``tokens_per_minute``), each holding one second's
   worth. A request reserves prompt estimate + max_tokens tokens; a request larger than the
   bucket goes when the bucket is full and leaves it in debt (it waits, it never deadlocks).
5. **The answer.** ``settle(prompt, completion)`` turns the reservation into the actual cost and
   refunds (or debits) the token bucket; without counts the worst case stays spent. A failure
   (``release_failed``) still counts as a request (it was sent), and gives the money back unless
   the server may have done the work: a timeout, a cancelled or abandoned request, or a stream
   that had started answering keep the worst case as spent (it may have been billed; a cap must
   err safe). Only ``release_failed(sent=False)`` (it never left the client) gives back all.

**The guarantee.** spent <= budget_usd whatever the threads do, as long as every answer costs
at most its reservation. Completions are capped by max_tokens, and the prompt is reserved at
``prompt_token_bound``: its UTF-8 bytes (no tokenizer spends more than a token per byte, save
SentencePiece's one leading space) plus a chat-template allowance per message and per request.
So it holds for any tokenizer and any text; what it cannot see (an image part, a template that
adds more than the allowance) is still booked when answered and counted in ``overruns``.
Token buckets keep the closer ``estimate_prompt_tokens`` (1.3-1.8x on natural text).

**Types.** "A limiter" is an :class:`AnyLimiter`: a ``Limiter``, or ``UNLIMITED`` (``Limiter.disabled()``)
for an LM without limits; what it hands out is an :class:`AnyPermit` (a ``Permit``, or ``NO_PERMIT``).

**Sharing.** ``copy.copy`` / ``copy.deepcopy`` of a limiter return the limiter itself. A pickled
limiter carries its ledger's handle if the ledger is shared (``share_on_ray()``); a local ledger
does not travel: the unpickled copy refuses requests with a ``ConfigurationError`` until
attached to a shared ledger, so no process ever gets a fresh full budget of its own. A child
made by ``fork`` (multiprocessing's fork start method, gunicorn ``--preload``) refuses the same
way, unless ``max_concurrency`` is the LM's only limit; its gate starts empty. The concurrency
gate is per process: on Ray, ``max_concurrency`` bounds each worker.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..errors import BudgetExceededError, LimiterTimeoutError

# Loaded with the package: what an LM without limits needs (it pays for nothing else).
from ._config import Limits
from ._permit import NO_PERMIT, AnyPermit, Permit, may_have_been_billed
from ._protocol import AnyLimiter
from ._unlimited import UNLIMITED, UnlimitedLimiter

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from ..errors import BudgetExceededError, LimiterDeadlockError, LimiterTimeoutError
    from ._backends import DetachedLedger, LedgerBackend, LocalLedger
    from ._clock import SYSTEM_CLOCK, Clock, SystemClock
    from ._estimate import Estimate, estimate_prompt_tokens, estimate_text_tokens, prompt_token_bound
    from ._limiter import Limiter
    from ._ray import RayLedger  # noqa: F401  (a lazy name, not in __all__: it needs Ray)
    from ._report import SpendReport

# Loaded on first use, by the LMs that have limits.
_LAZY = {
    "DetachedLedger": "._backends",
    "LedgerBackend": "._backends",
    "LocalLedger": "._backends",
    "SYSTEM_CLOCK": "._clock",
    "Clock": "._clock",
    "SystemClock": "._clock",
    "BudgetExceededError": "..errors",
    "LimiterTimeoutError": "..errors",
    "LimiterDeadlockError": "..errors",
    "Estimate": "._estimate",
    "estimate_prompt_tokens": "._estimate",
    "estimate_text_tokens": "._estimate",
    "prompt_token_bound": "._estimate",
    "Limiter": "._limiter",
    "SpendReport": "._report",
    "RayLedger": "._ray",  # without importing Ray up front
}

__all__ = [
    "NO_PERMIT",
    "SYSTEM_CLOCK",
    "UNLIMITED",
    "AnyLimiter",
    "AnyPermit",
    "BudgetExceededError",
    "Clock",
    "DetachedLedger",
    "Estimate",
    "LedgerBackend",
    "Limiter",
    "LimiterDeadlockError",
    "LimiterTimeoutError",
    "Limits",
    "LocalLedger",
    "Permit",
    "SpendReport",
    "SystemClock",
    "UnlimitedLimiter",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
    "may_have_been_billed",
    "prompt_token_bound",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
