"""One error root: every exception class the package defines is an ``AnyscaleError``, sits in the tree
``errors.py``'s docstring draws (and that tree names only real classes, with their real parents), and
keeps the DSPy and Python bases that decide how it is caught and retried, through a pickle too."""

from __future__ import annotations

import ast
import copy
import importlib
import pickle
import pkgutil
import re
from pathlib import Path

import pytest
from dspy import lm15
from dspy.clients.errors import wrap_error
from dspy.utils.exceptions import (
    LMConfigurationError,
    LMError,
    LMNotConfiguredError,
    LMProviderError,
    LMRateLimitError,
    LMUnsupportedFeatureError,
    is_retryable_lm_error,
)

import dspy_anyscale
from dspy_anyscale import errors
from dspy_anyscale.errors import (
    AnyscaleError,
    BudgetExceededError,
    ConfigurationError,
    InvalidParameterError,
    LimiterDeadlockError,
    LimiterTimeoutError,
    MissingConfigurationError,
    PoolError,
    RetryWaitTooLongError,
    UnexpectedResponseError,
    UnsupportedParameterError,
)

PACKAGE_DIR = Path(dspy_anyscale.__file__).parent
NOT_IMPORTED = {"dspy_anyscale.__main__"}  # runs the CLI
# Modules that need an extra (ray, otel, parquet): walked when it is installed.
OPTIONAL = ("dspy_anyscale.ray", "dspy_anyscale.tracing._otel", "dspy_anyscale.runs.parquet")
IMPORTED: set[str] = set()


def _package_modules() -> list[str]:
    names = [dspy_anyscale.__name__]
    names += [info.name for info in pkgutil.walk_packages(dspy_anyscale.__path__, "dspy_anyscale.")]
    return [name for name in names if name not in NOT_IMPORTED]


def _defined_exceptions() -> set[type[BaseException]]:
    """Every exception class defined in a module of the package (re-exports of DSPy's left out)."""
    found = set()
    for name in _package_modules():
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name.startswith(OPTIONAL):
                continue
            raise
        IMPORTED.add(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == name:
                found.add(value)
    return found


PACKAGE_EXCEPTIONS = _defined_exceptions()
PUBLIC = {cls for cls in PACKAGE_EXCEPTIONS if not cls.__name__.startswith("_")}
BY_NAME = {cls.__name__: cls for cls in PUBLIC}


# --- the tree in errors.py's docstring ------------------------------------------------------------

_ENTRY = re.compile(r"^    (?P<rails>(?:[│ ]   )*)(?P<branch>[├└]── )(?P<name>\w+)")
_ROOT = re.compile(r"^    (?P<name>AnyscaleError)\b")


def _tree() -> list[tuple[str, str | None, str]]:
    """(name, parent's name, the entry's text) for each entry of the docstring's first tree."""
    lines = (errors.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if _ROOT.match(line))
    entries: list[tuple[str, str | None, list[str]]] = [("AnyscaleError", None, [lines[start]])]
    path = ["AnyscaleError"]  # the ancestors of the entry being read, by depth
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        entry = _ENTRY.match(line)
        if entry is None:
            entries[-1][2].append(line)  # the previous entry's description goes on
            continue
        depth = len(entry["rails"]) // 4 + 1
        del path[depth:]
        entries.append((entry["name"], path[depth - 1], [line]))
        path.append(entry["name"])
    return [(name, parent, " ".join(text)) for name, parent, text in entries]


TREE = _tree()


def test_the_tree_parses():
    assert TREE[0][:2] == ("AnyscaleError", None)
    assert ("LimiterDeadlockError", "LimiterTimeoutError") in [(name, parent) for name, parent, _ in TREE]


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` that can run: what sits under ``if TYPE_CHECKING:`` exists for the type checker
    only (``_dspy_types``' views of DSPy's classes), and is never defined, let alone raised."""
    nodes = []
    pending = [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def test_the_walk_finds_every_exception_class_in_the_source():
    """The import walk misses nothing: every ``class ...Error`` / ``...Exception`` in the package's
    source is a module-level class it found (none hidden inside a function)."""
    found = {(cls.__module__, cls.__qualname__) for cls in PACKAGE_EXCEPTIONS}
    for path in PACKAGE_DIR.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts).removesuffix(".__init__")
        if module not in IMPORTED:
            continue
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                assert (module, node.name) in found, f"{module}.{node.name} is not a module-level exception class"


def test_every_exception_class_of_the_package_is_an_anyscale_error():
    outside = sorted(
        f"{cls.__module__}.{cls.__qualname__}" for cls in PACKAGE_EXCEPTIONS if not issubclass(cls, AnyscaleError)
    )
    assert not outside


def test_public_exception_names_are_unique():
    assert len(BY_NAME) == len(PUBLIC), sorted(cls.__name__ for cls in PUBLIC)


def test_the_tree_names_every_public_exception_class_and_only_those():
    assert sorted(name for name, _, _ in TREE) == sorted(BY_NAME)


@pytest.mark.parametrize(("name", "parent", "text"), TREE, ids=[name for name, _, _ in TREE])
def test_each_entry_has_its_real_parent_and_names_its_other_bases(name, parent, text):
    cls = BY_NAME[name]
    bases = cls.__bases__
    if parent is None:
        assert not any(issubclass(base, AnyscaleError) for base in bases), "the root has no root above it"
    else:
        assert BY_NAME[parent] in bases, f"{name}'s parent in the tree is {parent}, its bases are {bases}"
    for base in bases:
        if base is BY_NAME.get(parent or "") or base in (Exception, AnyscaleError):
            continue
        assert re.search(rf"\b{base.__name__}\b", text), f"{name}'s entry does not say it is also a {base.__name__}"


def test_private_exception_classes_are_kinds_of_a_public_one():
    for cls in PACKAGE_EXCEPTIONS - PUBLIC:
        assert any(base in PUBLIC for base in cls.__mro__[1:]), cls


# --- every class: constructs, pickles, keeps its bases and its retry semantics ----------------------


def _examples() -> dict[type[BaseException], BaseException]:
    """One instance of every exception class of the package, built as the package builds it."""
    made: dict[type[BaseException], BaseException] = {
        AnyscaleError: AnyscaleError("root"),
        ConfigurationError: ConfigurationError("timeout must be positive", model="m"),
        MissingConfigurationError: MissingConfigurationError("No API key configured"),
        InvalidParameterError: InvalidParameterError("stop must be a string", parameter="stop", expected="a string"),
        UnsupportedParameterError: UnsupportedParameterError("tools are per call", features=["tools"]),
        PoolError: PoolError("this ProgramPool refuses work"),
        UnexpectedResponseError: UnexpectedResponseError(
            "Expected a JSON body", provider="anyscale", status=200, request_id="req-1"
        ),
        BudgetExceededError: BudgetExceededError(
            "max_requests reached", limit="max_requests", requests=3, max_requests=3, model="m"
        ),
        LimiterTimeoutError: LimiterTimeoutError("waited 1s"),
        LimiterDeadlockError: LimiterDeadlockError("would wait for this loop's own tasks"),
        RetryWaitTooLongError: RetryWaitTooLongError(
            lm15.RateLimitError("slow down", provider="anyscale", status=429, retry_after=99999.0), limit=60.0
        ),
    }
    # The stand-in servers' errors take a message. In a fixed order: pytest-xdist's workers must
    # collect the same tests in the same order.
    for cls in sorted(PACKAGE_EXCEPTIONS - set(made), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}"):
        made[cls] = cls("could not start: see its log")
    return made


EXAMPLES = _examples()


def test_every_class_has_an_example():
    assert set(EXAMPLES) == PACKAGE_EXCEPTIONS


@pytest.mark.parametrize("error", list(EXAMPLES.values()), ids=[cls.__qualname__ for cls in EXAMPLES])
def test_a_pickle_round_trip_keeps_class_message_and_attributes(error):
    for copied in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(copied) is type(error)
        assert str(copied) == str(error) and copied.args == error.args
        assert vars(copied) == vars(error)
        assert isinstance(copied, AnyscaleError)


@pytest.mark.parametrize("error", list(EXAMPLES.values()), ids=[cls.__qualname__ for cls in EXAMPLES])
def test_none_is_retried_by_dspy_before_or_after_a_pickle(error):
    """DSPy retries what its boundary turns into a retryable LMError; ours never are. An LMError passes
    the boundary as itself, an lm15 error becomes its public class (LMProviderError for ours)."""
    for candidate in (error, pickle.loads(pickle.dumps(error))):
        public = wrap_error(candidate, model="m")
        if isinstance(candidate, LMError):
            assert public is candidate
        elif isinstance(candidate, lm15.LM15Error):
            assert type(public) is LMProviderError
        assert not is_retryable_lm_error(public)


def test_the_dspy_and_python_bases_are_kept():
    assert issubclass(ConfigurationError, LMConfigurationError) and issubclass(ConfigurationError, ValueError)
    assert issubclass(MissingConfigurationError, LMNotConfiguredError)
    assert issubclass(InvalidParameterError, TypeError) and issubclass(InvalidParameterError, ValueError)
    assert issubclass(UnsupportedParameterError, LMUnsupportedFeatureError)
    assert issubclass(BudgetExceededError, LMError) and issubclass(LimiterTimeoutError, LMError)
    assert issubclass(LimiterTimeoutError, TimeoutError) and issubclass(LimiterDeadlockError, LimiterTimeoutError)
    assert issubclass(UnexpectedResponseError, lm15.ProviderError)
    assert issubclass(RetryWaitTooLongError, lm15.ProviderError) and issubclass(PoolError, RuntimeError)


def test_every_you_passed_something_wrong_error_is_one_family():
    for cls in (MissingConfigurationError, InvalidParameterError, UnsupportedParameterError):
        assert issubclass(cls, ConfigurationError), cls


def test_keyword_attributes_survive_a_pickle():
    invalid = pickle.loads(pickle.dumps(EXAMPLES[InvalidParameterError]))
    assert (invalid.parameter, invalid.expected) == ("stop", "a string")
    unsupported = pickle.loads(pickle.dumps(EXAMPLES[UnsupportedParameterError]))
    assert unsupported.features == ["tools"]
    budget = pickle.loads(pickle.dumps(EXAMPLES[BudgetExceededError]))
    assert (budget.limit, budget.requests, budget.max_requests, budget.model) == ("max_requests", 3, 3, "m")
    waited = pickle.loads(pickle.dumps(EXAMPLES[RetryWaitTooLongError]))
    assert waited.retry_after == 99999.0 and waited.public is LMRateLimitError
    assert isinstance(waited.public_error("m"), LMRateLimitError)
