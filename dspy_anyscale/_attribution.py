"""Which DSPy module made an LM call: its path inside the outermost module, e.g. ``generate_query.predict``.

DSPy keeps the modules being called in ``settings.caller_modules``, outermost first: each
``Module.__call__`` / ``acall`` appends itself inside a ``settings.context``. That context is a
context variable, so it follows ``acall`` into tasks, and DSPy's ``ParallelExecutor``
(``dspy.Parallel``, ``dspy.Evaluate``, the optimizers) copies it into its worker threads. A call
made outside any module (``lm("...")``) has no module: ``None``.

Each step of the path is the attribute name under which the parent holds the child, in DSPy's
own spelling (``named_predictors()``: ``name``, ``name[0]``, ``name['key']``); a child the parent
does not hold (one built inside ``forward``) is named by its class. The outermost module is
named only when it is the one caller: a bare ``dspy.Predict`` called directly is ``Predict``.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from dspy.dsp.utils.settings import settings

from . import _constants as C


def current_module() -> str | None:
    """The path of the DSPy module calling now, or None outside any module."""
    try:
        chain = settings.caller_modules
    except Exception:  # a DSPy without it: attribution is bookkeeping, never a failure
        return None
    if not chain:
        return None
    return module_path(chain)


def module_path(chain: Any) -> str:
    """``a.b.c`` for modules [outer, a, b, c] (each held by the one before), class names where unnamed.

    >>> import dspy
    >>> class QA(dspy.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.generate_query = dspy.ChainOfThought("question -> query")
    >>> qa = QA()
    >>> module_path([qa, qa.generate_query, qa.generate_query.predict])
    'generate_query.predict'
    >>> module_path([qa])
    'QA'
    """
    modules = _distinct(chain)
    if len(modules) == 1:
        return type(modules[0]).__name__
    return ".".join(child_name(parent, child) for parent, child in pairwise(modules))


def _distinct(chain: Any) -> list[Any]:
    """The chain without a module repeated back to back (a module whose ``forward`` calls ``super().__call__``)."""
    modules: list[Any] = []
    for module in chain:
        if not modules or modules[-1] is not module:
            modules.append(module)
    return modules


def child_name(parent: Any, child: Any) -> str:
    """The attribute of ``parent`` that holds ``child`` (one level: lists and dicts included), else its class."""
    attributes = getattr(parent, "__dict__", None) or {}
    for name, value in attributes.items():
        if value is child:
            return str(name)
    for name, value in attributes.items():  # then containers; a big one (a corpus) is no list of modules
        if isinstance(value, list | tuple) and len(value) <= C.ATTRIBUTION_LARGEST_CONTAINER:
            for index, item in enumerate(value):
                if item is child:
                    return f"{name}[{index}]"
        elif isinstance(value, dict) and len(value) <= C.ATTRIBUTION_LARGEST_CONTAINER:
            for key, item in value.items():
                if item is child:
                    return f"{name}['{key}']"
    return type(child).__name__
