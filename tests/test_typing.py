"""The typing rules mypy cannot check itself, checked without running it (CI runs ``mypy``, strict).

* every ``type: ignore`` in the package names its error code and says why on the same line;
* ``dspy_anyscale._dspy_types`` (DSPy's types as this package uses them) is for the type checker only:
  imported under ``TYPE_CHECKING``, never loaded when the package runs;
* what it says of DSPy is true of the installed DSPy: every field, constructor argument, class and base
  it names exists there. DSPy ships no types, so mypy trusts the file; a DSPy upgrade that renames a
  field fails here instead of silently in production.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy import lm15
from dspy.utils import exceptions as dspy_exceptions

import dspy_anyscale

PACKAGE_DIR = Path(dspy_anyscale.__file__).parent
TYPES_PATH = PACKAGE_DIR / "_dspy_types.py"
TYPES_TREE = ast.parse(TYPES_PATH.read_text(encoding="utf-8"))

# --- every type: ignore names its code and says why ---------------------------------------------------

_IGNORE = re.compile(r"type:\s*ignore")
# ``# type: ignore[code, ...]  # the reason``
_EXPLAINED = re.compile(r"#\s*type:\s*ignore\[[\w\-]+(?:,\s*[\w\-]+)*\]\s*#\s*\S")


def unexplained_ignores(source: str) -> list[int]:
    """Lines of ``source`` with a ``type: ignore`` comment that lacks an error code or a reason."""
    return [
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT and _IGNORE.search(token.string) and not _EXPLAINED.match(token.string)
    ]


@pytest.mark.parametrize(
    ("line", "explained"),
    [
        ("x = f()  # type: ignore\n", False),
        ("x = f()  # type: ignore[arg-type]\n", False),
        ("x = f()  # type: ignore  # DSPy is untyped\n", False),
        ("x = f()  # type: ignore[arg-type]  #\n", False),
        ("x = f()  # type: ignore[arg-type]  # DSPy is untyped\n", True),
        ("x = f()  # type: ignore[arg-type, misc]  # DSPy is untyped\n", True),
        ('text = "# type: ignore"\n', True),  # a string, not a comment
    ],
)
def test_the_ignore_check_tells_a_reasoned_ignore_from_a_bare_one(line: str, explained: bool):
    assert (unexplained_ignores(line) == []) is explained


def test_every_type_ignore_in_the_package_names_its_code_and_says_why():
    offenders = [
        f"{path.relative_to(PACKAGE_DIR).as_posix()}:{line}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for line in unexplained_ignores(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "write `# type: ignore[<code>]  # <why>` on these lines (or type the code instead)"


# --- _dspy_types is for the type checker only ----------------------------------------------------------


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(node: ast.AST, leaf: str) -> bool:
    """True when ``node`` imports a module named ``leaf`` (``from ._x import ...``, ``from . import _x``, ...)."""
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").rpartition(".")[2] == leaf or any(alias.name == leaf for alias in node.names)
    return isinstance(node, ast.Import) and any(alias.name.rpartition(".")[2] == leaf for alias in node.names)


def _imports_outside_type_checking(tree: ast.AST, leaf: str) -> list[int]:
    """Lines that import the module ``leaf`` where the import would run (anywhere but ``if TYPE_CHECKING:``)."""
    found: list[int] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            assert isinstance(node, ast.If)
            pending.extend(node.orelse)
            continue
        if _imports(node, leaf):
            found.append(node.lineno)
        pending.extend(ast.iter_child_nodes(node))
    return sorted(found)


def test_the_import_check_tells_a_type_checking_import_from_a_running_one():
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._dspy_types import Request\n"
    running = "from ._dspy_types import Request\n"
    in_else = "if TYPE_CHECKING:\n    pass\nelse:\n    from .._dspy_types import lm15\n"
    in_function = "def f():\n    from dspy_anyscale import _dspy_types\n"
    assert _imports_outside_type_checking(ast.parse(guarded), "_dspy_types") == []
    assert _imports_outside_type_checking(ast.parse(running), "_dspy_types") == [1]
    assert _imports_outside_type_checking(ast.parse(in_else), "_dspy_types") == [4]
    assert _imports_outside_type_checking(ast.parse(in_function), "_dspy_types") == [2]


def test_the_type_views_are_imported_only_under_type_checking():
    """At run time every DSPy name is DSPy's own: the views (Protocols, stand-in classes) never stand in."""
    offenders = [
        f"{path.relative_to(PACKAGE_DIR).as_posix()}:{line}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path != TYPES_PATH
        for line in _imports_outside_type_checking(ast.parse(path.read_text(encoding="utf-8")), "_dspy_types")
    ]
    assert not offenders, "import dspy_anyscale._dspy_types under `if TYPE_CHECKING:` only"


def test_running_the_package_never_loads_the_type_views():
    code = (
        "import os, sys\n"
        "os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'\n"
        "import dspy_anyscale, dspy_anyscale.cli, dspy_anyscale.usage, dspy_anyscale.limits\n"
        "print('dspy_anyscale._dspy_types' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --- what _dspy_types says of DSPy is true of the installed DSPy --------------------------------------------


def _classes(body: list[ast.stmt]) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in body if isinstance(node, ast.ClassDef)}


PROTOCOLS = {
    name: node
    for name, node in _classes(TYPES_TREE.body).items()
    if any(isinstance(base, ast.Name) and base.id == "Protocol" for base in node.bases)
}
VIEWS = _classes(next(node for node in TYPES_TREE.body if _is_type_checking(node)).body)
# Protocols with no lm15 class of their name: what they describe, checked against these classes.
STAND_INS = {
    "_Dataclass": (lm15.Request, lm15.Config),
    "Tool": (lm15.FunctionTool, lm15.BuiltinTool),
    "OtherPart": (),  # checked below: the part kinds no other Protocol names
    "LM15Module": (),  # checked below: the module itself
}


def _members(node: ast.ClassDef) -> set[str]:
    """The fields, properties and methods a class body declares (``__init__`` aside)."""
    names = {item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}
    names |= {
        item.target.id for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    return {name for name in names if name == "__dataclass_fields__" or not name.startswith("__")}


def _init(node: ast.ClassDef) -> ast.FunctionDef | None:
    return next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)


def _check_constructor(init: ast.FunctionDef, real: Any) -> None:
    """Every argument the view declares, the real constructor takes the same way; every argument the real
    one requires, the view declares (else mypy would let a call leave it out)."""
    real_params = list(inspect.signature(real).parameters.values())
    by_name = {param.name: param for param in real_params}
    takes_any_keyword = any(param.kind is param.VAR_KEYWORD for param in real_params)
    positional = [arg.arg for arg in init.args.args[1:]]  # without self
    for index, name in enumerate(positional):
        assert index < len(real_params) and real_params[index].name == name, f"{real}: argument {index} is not {name}"
    for arg in init.args.kwonlyargs:
        param = by_name.get(arg.arg)
        assert (param is not None and param.kind is not param.POSITIONAL_ONLY) or takes_any_keyword, (
            f"{real} takes no {arg.arg}="
        )
    declared = set(positional) | {arg.arg for arg in init.args.kwonlyargs}
    required = {
        p.name
        for p in real_params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
    }
    assert required <= declared, f"{real} requires {sorted(required - declared)}"


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_each_protocol_describes_what_the_dspy_class_has(name: str):
    node = PROTOCOLS[name]
    reals = STAND_INS.get(name, (getattr(lm15, name, None),))
    assert None not in reals, f"dspy.lm15 has no {name}: name the class it describes in STAND_INS"
    for real in reals:
        for member in _members(node):
            assert hasattr(real, member), f"dspy.lm15.{real.__name__} has no {member}"
        init = _init(node)
        if init is not None:
            _check_constructor(init, real)


def _literal_types(node: ast.ClassDef) -> set[str]:
    """The values of ``def type(self) -> Literal[...]``."""
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "type" and isinstance(item.returns, ast.Subscript):
            values = item.returns.slice
            elements = values.elts if isinstance(values, ast.Tuple) else [values]
            return {element.value for element in elements if isinstance(element, ast.Constant)}
    return set()


def test_the_part_union_names_every_kind_of_part_lm15_has():
    """``part.type == "thinking"`` narrows a Part: each lm15 part class is one Protocol's ``type``."""
    kinds = {
        cls.__dataclass_fields__["type"].default
        for name in dir(lm15)
        if name.endswith("Part") and hasattr(cls := getattr(lm15, name), "__dataclass_fields__")
    }
    declared = [_literal_types(node) for name, node in PROTOCOLS.items() if name.endswith("Part")]
    assert kinds == set().union(*declared)
    for name, node in PROTOCOLS.items():
        if name.endswith("Part") and name != "OtherPart":
            assert _literal_types(node) == {getattr(lm15, name).__dataclass_fields__["type"].default}


def _module_view() -> dict[str, str]:
    """``LM15Module``'s property → the class (a Protocol or a view) it is typed as."""
    view = {}
    for item in PROTOCOLS["LM15Module"].body:
        if isinstance(item, ast.FunctionDef) and isinstance(item.returns, ast.Subscript):
            target = item.returns.slice
            assert isinstance(target, ast.Name), ast.unparse(item)
            view[item.name] = target.id
    return view


MODULE_VIEW = _module_view()


def test_the_module_view_names_dspy_lm15_classes_by_their_types():
    for attribute, typed_as in MODULE_VIEW.items():
        assert hasattr(lm15, attribute), f"dspy.lm15 has no {attribute}"
        assert typed_as in PROTOCOLS or typed_as in VIEWS, f"lm15.{attribute} is typed as unknown {typed_as}"
        if typed_as in PROTOCOLS:
            assert typed_as == attribute, f"lm15.{attribute} is typed as the Protocol of another class"


def _real(view_name: str) -> type:
    """The DSPy class a view stands for (lm15's own names where the module view renames one), or the
    builtin a view derives from (``Exception``, ``TimeoutError``)."""
    if view_name not in VIEWS:
        return getattr(builtins, view_name)
    renamed = {typed_as: attribute for attribute, typed_as in MODULE_VIEW.items() if typed_as != attribute}
    if view_name in renamed:
        return getattr(lm15, renamed[view_name])
    if view_name == "LM":
        return dspy.LM
    for module in (dspy_exceptions, lm15):
        if isinstance(getattr(module, view_name, None), type):
            return getattr(module, view_name)
    raise AssertionError(f"DSPy has no class for the view {view_name}")


ERROR_VIEWS = sorted(name for name, node in VIEWS.items() if name.endswith("Error"))


def _instance(cls: type, init: ast.FunctionDef | None) -> Any:
    """``cls`` built with every keyword argument the view declares for it (``None`` for each)."""
    keywords = {arg.arg: None for arg in init.args.kwonlyargs} if init is not None else {}
    if init is not None and init.args.args[1:]:
        return cls("message", **keywords)
    return cls(**keywords)


@pytest.mark.parametrize("name", ERROR_VIEWS)
def test_each_error_view_has_the_bases_attributes_and_arguments_of_the_dspy_class(name: str):
    node, real = VIEWS[name], _real(name)
    for base in node.bases:
        assert isinstance(base, ast.Name)
        assert issubclass(real, _real(base.id)), f"{real} is not a {base.id}"
    # The nearest __init__ the view declares, on the class or a base view (as mypy reads it).
    init, ancestor = _init(node), node
    while init is None and ancestor.bases and isinstance(ancestor.bases[0], ast.Name) and ancestor.bases[0].id in VIEWS:
        ancestor = VIEWS[ancestor.bases[0].id]
        init = _init(ancestor)
    error = _instance(real, init)
    for member in _members(node):
        assert hasattr(error, member), f"{real} has no {member}"


def test_the_error_details_are_what_every_lm15_error_takes():
    keys = _members(VIEWS["ErrorDetails"])
    assert keys and keys <= set(inspect.signature(lm15.LM15Error).parameters)


def test_the_lm_view_has_what_dspy_lm_has(make_lm):
    node = VIEWS["LM"]
    lm = make_lm()
    assert isinstance(lm, dspy.LM)
    for member in _members(node):
        assert hasattr(lm, member), f"dspy.LM has no {member}"
    init = _init(node)
    assert init is not None
    _check_constructor(init, dspy.LM)
