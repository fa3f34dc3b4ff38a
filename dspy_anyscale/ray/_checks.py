"""Argument checks for the Ray entry points: each names the parameter and what it takes, before any Ray work."""

from __future__ import annotations

import math
import reprlib
from typing import Any, NoReturn

import dspy

from ..anyscale import Anyscale
from ..errors import ConfigurationError


def fail(name: str, expected: str, value: Any, *, show: bool = False) -> NoReturn:
    # Objects are described by type only: a value could be a key passed in the wrong place.
    shown = f"{type(value).__name__} {reprlib.repr(value)}" if show else type(value).__name__
    raise ConfigurationError(f"{name} must be {expected}, got {shown}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_program(program: Any) -> None:
    if not isinstance(program, dspy.Module):
        fail("program", "a dspy.Module (dspy.Predict(...), dspy.ChainOfThought(...), your own Module)", program)


def check_lm(lm: Any) -> None:
    if not isinstance(lm, Anyscale):
        fail("lm", "a dspy_anyscale.Anyscale (each worker rebuilds it from lm.dump_state())", lm)


def check_adapter(adapter: Any) -> None:
    if adapter is not None and not isinstance(adapter, dspy.Adapter):
        fail("adapter", "None or a dspy.Adapter, such as dspy.JSONAdapter()", adapter)


def check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, "a positive int", value, show=True)


def check_positive_number(name: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        fail(name, "a positive number", value, show=True)


def check_optional(*, concurrency: Any, threads_per_actor: Any, num_cpus: Any) -> None:
    ints = {"concurrency": concurrency, "threads_per_actor": threads_per_actor}
    check_positive_ints(**{name: value for name, value in ints.items() if value is not None})
    if num_cpus is not None:
        check_positive_number("num_cpus", num_cpus)
