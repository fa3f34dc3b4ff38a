"""The public surface is exactly what ``__all__`` says, and importing it has no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dspy_anyscale
from dspy_anyscale import errors


def test_the_package_exports_exactly_all():
    lazy = set(dspy_anyscale._LAZY)  # loaded on first use (dspy_anyscale.runs): in vars() once used
    public = {name for name in vars(dspy_anyscale) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(dspy_anyscale, name)).__name__ == "module"}
    assert public - modules - lazy == set(dspy_anyscale.__all__) - {"__version__"} - lazy
    assert lazy <= set(dspy_anyscale.__all__)
    for name in dspy_anyscale.__all__:
        assert hasattr(dspy_anyscale, name), name


def test_the_error_module_exports_exactly_all():
    classes = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}
    internal = {"RetryWaitTooLongError"}  # raised inside the engine, never to users
    assert classes - internal - {"LM15Error", "ProviderError", "RateLimitError"} == set(errors.__all__)


def test_importing_reads_no_environment_and_loads_no_http_client():
    code = (
        "import os, sys\n"
        "os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'\n"
        "import dspy_anyscale\n"
        "print(sorted(m for m in ('aiohttp', 'httpx', 'dotenv', 'opentelemetry', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "aiohttp" not in loaded and "dotenv" not in loaded and "opentelemetry" not in loaded and "ray" not in loaded


# --- defaults live in _constants.py -------------------------------------------------------------------

PACKAGE_DIR = Path(dspy_anyscale.__file__).parent
# Numbers that stay where they are, and why (paths relative to the package).
NOT_DEFAULTS = {
    "_wire.py": "parse_response(status=200): the status of an answer given without one, not a setting",
    "tracing/_attributes.py": "histogram buckets the OpenTelemetry GenAI conventions prescribe, beside their names",
    "servers/": "the stand-in test servers: pinned installs and their own timeouts (stdlib-only scripts)",
    "testing.py": "the test doubles' own arguments",
}


def _literal_number(node: ast.AST) -> bool:
    """A number other than 0 and 1 (counters start at 0, a call makes 1 request), or a tuple or sum of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float) and not isinstance(node.value, bool) and node.value not in (0, 1)
    if isinstance(node, ast.UnaryOp):
        return _literal_number(node.operand)
    if isinstance(node, ast.Tuple):
        return any(_literal_number(element) for element in node.elts)
    if isinstance(node, ast.BinOp):
        return _literal_number(node.left) or _literal_number(node.right)
    return False


def _literal_defaults(tree: ast.Module) -> list[str]:
    """Numbers written as a parameter's default, a dataclass field's default, or a module constant."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            found += [f"{node.name}(... = {ast.unparse(d)})" for d in defaults if _literal_number(d)]
        elif isinstance(node, ast.ClassDef):
            fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None]
            found += [f"{node.name}.{ast.unparse(s)}" for s in fields if _literal_number(s.value)]
    constants = [s for s in tree.body if isinstance(s, ast.Assign | ast.AnnAssign) and s.value is not None]
    found += [ast.unparse(s)[:80] for s in constants if _literal_number(s.value)]
    return found


def test_numbers_that_are_defaults_live_in_constants():
    """ARCHITECTURE.md: every default lives in _constants.py; nothing else holds a literal default."""
    offenders = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        relative = path.relative_to(PACKAGE_DIR).as_posix()
        if relative == "_constants.py" or any(relative.startswith(prefix) for prefix in NOT_DEFAULTS):
            continue
        found = _literal_defaults(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[relative] = found
    assert not offenders, "move these to _constants.py (or say in NOT_DEFAULTS why they are not defaults)"


# --- arrows point one way ---------------------------------------------------------------------------------

# Import cycles not untied yet, each a TYPE_CHECKING import (issue 24 unties Limiter <-> Permit).
KNOWN_CYCLES = [{"dspy_anyscale._identity", "dspy_anyscale._wire"}]


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports, anywhere in it: at the top, in a function, under TYPE_CHECKING."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return (found & modules) - {name}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_module_imports_one_that_imports_it_back():
    """Counting every import (a TYPE_CHECKING one or one inside a function too), the package's modules
    form no cycle: the limiter and its permit, the validation layer and what uses it, included."""
    paths = list(PACKAGE_DIR.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imports(path, modules) for path in paths}
    cycles = [cycle for cycle in _cycles(graph) if cycle not in KNOWN_CYCLES]
    assert not cycles
