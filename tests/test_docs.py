"""Every Python example in README.md and docs/*.md runs, so the documentation cannot drift from the code.

A page's ```python blocks run in order, in one namespace (a later block may use what an earlier one
defined), in a fresh interpreter per page (examples configure DSPy, tracing and Ray globally), with
``ANYSCALE_API_BASE`` / ``ANYSCALE_API_KEY`` pointing at a ``StubServer`` started in that interpreter
and the working directory in a temporary folder (examples write ``usage.jsonl``). Top-level ``await``
and ``async for`` run as in a notebook. A block that starts with ``>>>`` is a session: each example
runs, and the value of an expression must have the shape of the output the page shows (the same
type; for a literal, the same keys and item types; for ``Name(...)``, a ``Name``). Real models answer
differently from the stub, so only shapes are compared, never text.

Markers, HTML comments right before a block (invisible on GitHub and on the site):

* ``<!-- docs: skip, why -->``: the block is not run (say why);
* ``<!-- docs: ray -->``: the block needs Ray; it runs (with the page's other blocks) in the ``ray`` tests;
* ``<!-- docs: setup`` + lines of code + ``-->``: hidden code run before the block, for what the reader
  brings (their data, their function, their keys);
* ``<!-- docs: stub`` + lines + ``-->``: hidden code for the stub only, run before the block with the
  stub as ``docs_stub`` (a responder, a scripted fault); the stub is reset after the block.

Fences other than python are ``text`` (output) or ``bash`` (commands) and never hold ``>>>``. A
deprecated call in an example fails its page: the docs show the current API.

Run one page by hand: ``python tests/test_docs.py docs/usage.md [--ray] [--api-base URL]``. The
README's examples also run against the stand-in (tests/integration/test_docs_stand_in.py).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import doctest
import inspect
import os
import re
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT_FENCES = {"text", "bash"}
DIRECTIVES = {"skip", "ray", "setup", "stub"}
README_SECTIONS = [
    "Quickstart",
    "Configuration",
    "Handling errors",
    "Retries",
    "Timeouts",
    "Long runs",
    "Several services: Router",
    "More",
]
README_MAX_LINES = 300
KEY = "esecret_DOCS_EXAMPLE_KEY_7f3a"
PAGE_TIMEOUT_S = 180  # a page's interpreter is killed after this: a hung example fails, never hangs the suite
RAY_PAGE_TIMEOUT_S = 420
COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # `await` / `async for` at top level, as in a notebook

_DIRECTIVE = re.compile(r"<!--\s*docs:\s*(\w+)\s*(?:[,:]\s*(.*?))?\s*(-->)?\s*$")
_FENCE = re.compile(r"^```(\S*)\s*$")


class DocsError(Exception):
    """A page whose examples cannot be run as written; the message says where and what to do."""


@dataclass(frozen=True)
class Snippet:
    """Hidden code from a ``setup`` or ``stub`` marker."""

    line: int  # the page line of the code's first line
    code: str
    stub_only: bool


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the page line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    ray: bool = False
    setup: tuple[Snippet, ...] = field(default_factory=tuple)

    @property
    def where(self) -> str:
        return f"{_page_id(self.page)}:{self.line}"

    @property
    def is_session(self) -> bool:
        return self.code.lstrip().startswith(">>>")


# --- reading a page -----------------------------------------------------------------------------


@dataclass
class _Pending:
    skip: str | None = None
    ray: bool = False
    setup: list[Snippet] = field(default_factory=list)
    line: int = 0  # where the first pending marker is, for errors

    def __bool__(self) -> bool:
        return self.skip is not None or self.ray or bool(self.setup)


def parse_page(page: Path) -> list[Block]:
    """The page's fenced blocks with the markers that precede them."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    pending = _Pending()
    index = 0
    while index < len(lines):
        line = lines[index]
        if (match := _DIRECTIVE.match(line.strip())) is not None:
            index = _read_directive(page, lines, index, match, pending)
            continue
        if (fence := _FENCE.match(line)) is not None:
            end = _closing_fence(page, lines, index)
            blocks.append(_block(page, index + 1, fence.group(1), "\n".join(lines[index + 1 : end]), pending))
            pending = _Pending()
            index = end + 1
            continue
        if pending and line.strip():
            raise DocsError(f"{page}:{pending.line}: a docs marker must come right before a ``` block")
        index += 1
    if pending:
        raise DocsError(f"{page}:{pending.line}: a docs marker at the end of the page, with no block after it")
    return blocks


def _read_directive(page: Path, lines: list[str], index: int, match: re.Match[str], pending: _Pending) -> int:
    name, argument, closed = match.group(1), (match.group(2) or "").strip(), match.group(3)
    where = f"{page}:{index + 1}"
    if name not in DIRECTIVES:
        raise DocsError(f"{where}: unknown docs marker {name!r}; use one of {sorted(DIRECTIVES)}")
    pending.line = pending.line or index + 1
    if name in ("setup", "stub"):
        if closed:
            raise DocsError(f"{where}: put a {name} marker's code on the lines after it, then '-->' alone")
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "-->"), None)
        if end is None:
            raise DocsError(f"{where}: the {name} marker is never closed with '-->' on a line of its own")
        code = "\n".join(lines[index + 1 : end])
        pending.setup.append(Snippet(index + 2, code, stub_only=name == "stub"))
        return end + 1
    if not closed:
        raise DocsError(f"{where}: end the {name} marker on the same line with '-->'")
    if name == "skip":
        if not argument:
            raise DocsError(f"{where}: say why the block is skipped: <!-- docs: skip, the reason -->")
        pending.skip = argument
    else:
        pending.ray = True
    return index + 1


def _closing_fence(page: Path, lines: list[str], start: int) -> int:
    for index in range(start + 1, len(lines)):
        if lines[index].startswith("```"):
            return index
    raise DocsError(f"{page}:{start + 1}: a ``` block that is never closed")


def _block(page: Path, line: int, lang: str, code: str, pending: _Pending) -> Block:
    return Block(page, line, lang, code, pending.skip, pending.ray, tuple(pending.setup))


def python_blocks(page: Path) -> list[Block]:
    return [block for block in parse_page(page) if block.lang == "python"]


# --- checking without running -------------------------------------------------------------------


def check_block(block: Block) -> None:
    """Raise DocsError unless the block is runnable, marked skip, or not Python (text, bash)."""
    if block.lang in TEXT_FENCES:
        if any(line.startswith(">>>") for line in block.code.split("\n")):
            raise DocsError(f"{block.where}: a Python session in a {block.lang} block: fence it as python to run it")
        if block.setup or block.ray:
            raise DocsError(f"{block.where}: docs markers apply to python blocks only")
        return
    if block.lang != "python":
        raise DocsError(f"{block.where}: fence {block.lang or '(none)'!r}: use python, text or bash")
    if block.skip is not None:
        return
    for line, source in [(s.line, s.code) for s in block.setup] + list(_sources(block)):
        try:
            _compile(source, block.page, line)
        except SyntaxError as exc:
            raise DocsError(
                f"{block.where}: not runnable Python ({exc.msg}, line {exc.lineno}): fix it, fence it as text, "
                "or mark it <!-- docs: skip, the reason -->"
            ) from exc


def _sources(block: Block) -> Iterator[tuple[int, str]]:
    """(page line, source) of the block's code, or of each example of a session."""
    if not block.is_session:
        if any(line.startswith(">>>") for line in block.code.split("\n")):
            raise DocsError(f"{block.where}: a block that mixes code and '>>>' lines: make it all one or the other")
        yield block.line + 1, block.code
        return
    for example in _examples(block):
        yield block.line + 1 + example.lineno, example.source


def _examples(block: Block) -> list[doctest.Example]:
    return doctest.DocTestParser().get_examples(block.code, name=block.where)


def _compile(source: str, page: Path, line: int, mode: str = "exec") -> Any:
    # Blank lines in front: a traceback then names the page and the line as it is in the page.
    return compile("\n" * (line - 1) + source, str(page), mode, flags=COMPILE_FLAGS, dont_inherit=True)


# --- comparing a session's value with the output the page shows --------------------------------


def shape_error(value: Any, shown: str) -> str | None:
    """Why ``value`` does not look like the output ``shown``, or None when it does."""
    shown = shown.strip()
    if not shown:
        return None
    if (constructor := re.match(r"([A-Za-z_]\w*)\(", shown)) is not None:
        expected_name = constructor.group(1)
        return None if type(value).__name__ == expected_name else f"a {type(value).__name__}, not a {expected_name}"
    try:
        expected = ast.literal_eval(shown)
    except (ValueError, SyntaxError):
        return f"cannot read the shown output {shown[:60]!r} as a literal or Name(...): fence that part as text"
    return _literal_shape_error(value, expected, "value")


def _literal_shape_error(value: Any, expected: Any, path: str) -> str | None:
    if isinstance(expected, bool) or not isinstance(expected, (int, float)):
        if type(value) is not type(expected):
            return f"{path} is a {type(value).__name__}, the page shows a {type(expected).__name__}"
    elif not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{path} is a {type(value).__name__}, the page shows a number"
    if isinstance(expected, dict):
        for key, item in expected.items():
            if key not in value:
                return f"{path} has no key {key!r} (it has {sorted(value)})"
            if (error := _literal_shape_error(value[key], item, f"{path}[{key!r}]")) is not None:
                return error
    if isinstance(expected, (list, tuple)) and expected and value:
        for number, item in enumerate(value):
            if (error := _literal_shape_error(item, expected[0], f"{path}[{number}]")) is not None:
                return error
    return None


# --- running a page (in its own interpreter) ----------------------------------------------------


def run_page(page: Path, *, with_ray: bool, namespace: dict[str, Any], stub: Any) -> int:
    """Run the page's blocks in order; the number of blocks run."""
    ran = 0
    for block in python_blocks(page):
        if block.skip is not None or (block.ray and not with_ray):
            continue
        print(f"--- {block.where}", file=sys.stderr, flush=True)
        for snippet in block.setup:
            if stub is not None or not snippet.stub_only:
                _execute(_compile(snippet.code, page, snippet.line), namespace)
        if block.is_session:
            _run_session(block, namespace)
        else:
            _execute(_compile(block.code, page, block.line + 1), namespace)
        if stub is not None:
            _reset_stub(stub)
        ran += 1
    return ran


def _execute(code: Any, namespace: dict[str, Any]) -> Any:
    result = eval(code, namespace)
    if code.co_flags & inspect.CO_COROUTINE:  # top-level await: run it as a notebook would
        return asyncio.run(result)
    return result


def _run_session(block: Block, namespace: dict[str, Any]) -> None:
    for example in _examples(block):
        line = block.line + 1 + example.lineno
        tree = ast.parse(example.source)
        ast.increment_lineno(tree, line - 1)  # tracebacks name the page's line
        *statements, last = tree.body
        if not isinstance(last, ast.Expr):
            _execute(_compile_tree(ast.Module(tree.body, []), block.page, "exec"), namespace)
            continue
        _execute(_compile_tree(ast.Module(statements, []), block.page, "exec"), namespace)
        value = _execute(_compile_tree(ast.Expression(last.value), block.page, "eval"), namespace)
        if value is not None and (error := shape_error(value, example.want)) is not None:
            raise AssertionError(f"{block.page}:{line}: {example.source.strip()!r} gave {value!r}: {error}")


def _compile_tree(tree: ast.Module | ast.Expression, page: Path, mode: str) -> Any:
    return compile(tree, str(page), mode, flags=COMPILE_FLAGS, dont_inherit=True)


def _reset_stub(stub: Any) -> None:
    from dspy_anyscale.testing import dspy_field_responder

    stub.reset()
    stub.responder = dspy_field_responder


class _OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (the tracing page's exporter), so that they go nowhere else."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _start_otlp_sink() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1/traces"


def main(argv: list[str] | None = None) -> int:
    """Run one page's examples against a stub server started here, or against a real server given by
    --api-base (then the stub markers are left out); exit 1 with the traceback on failure."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("page", type=Path)
    parser.add_argument("--ray", action="store_true", help="also run the blocks marked ray")
    parser.add_argument("--api-base", help="a real server's /v1 URL instead of the stub (key: $ANYSCALE_API_KEY)")
    args = parser.parse_args(argv)
    # The examples run as __main__: a deprecated call they make themselves (ours, or a library's that
    # warns at its caller) fails the page, so that the docs show the current API.
    warnings.filterwarnings("error", category=DeprecationWarning, module="__main__")
    os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", _start_otlp_sink())
    from dspy_anyscale.testing import StubServer

    with contextlib.ExitStack() as stack:
        stub = None if args.api_base else stack.enter_context(StubServer(api_key=KEY))
        os.environ["ANYSCALE_API_BASE"] = args.api_base or stub.base_url
        if stub is not None:
            os.environ["ANYSCALE_API_KEY"] = KEY
        namespace: dict[str, Any] = {"__name__": "__main__", "docs_stub": stub}
        try:
            ran = run_page(args.page.resolve(), with_ray=args.ray, namespace=namespace, stub=stub)
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            _shutdown_ray()
    print(f"ran {ran} blocks", file=sys.stderr)
    return 0


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


# --- the tests ----------------------------------------------------------------------------------


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def _runnable(page: Path, *, ray: bool) -> bool:
    blocks = [b for b in python_blocks(page) if b.skip is None]
    return any(b.ray for b in blocks) if ray else any(not b.ray for b in blocks)


def _run_in_subprocess(
    page: Path, tmp_path: Path, *, ray: bool, timeout: float, real_server: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the page's examples in a fresh interpreter; ``real_server`` = (base URL, key) instead of the stub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANYSCALE_", "PORTKEY_", "OTEL_"))}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        RAY_USAGE_STATS_ENABLED="0",
        DSPY_CACHEDIR=str(tmp_path / "dspy-cache"),
        DSPY_ANYSCALE_CACHE=str(tmp_path / "dspy-anyscale-cache"),
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(Path(__file__).resolve()), str(page), *(["--ray"] if ray else [])]
    if real_server is not None:
        command += ["--api-base", real_server[0]]
        env["ANYSCALE_API_KEY"] = real_server[1]
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{_page_id(page)}: the examples did not finish in {timeout} s:\n{_tail(exc.stderr)}")
    return done


def _assert_examples_run(page: Path, tmp_path: Path, *, ray: bool, timeout: float) -> None:
    done = _run_in_subprocess(page, tmp_path, ray=ray, timeout=timeout)
    assert done.returncode == 0, f"{_page_id(page)}: an example failed:\n{_tail(done.stderr)}"


def _tail(text: str | bytes | None, lines: int = 60) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join((text or "").splitlines()[-lines:])


def test_readme_keeps_its_shape() -> None:
    """What it is, the two commands, then the anchors in order, in at most 300 lines; the rest is in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md is over {README_MAX_LINES} lines: move a part to docs/"
    )
    sections = [line[3:] for line in _outside_fences(text) if line.startswith("## ")]
    assert sections == README_SECTIONS
    first = parse_page(ROOT / "README.md")[0]
    install_and_run, install_and_test = first.code.splitlines()
    assert first.lang == "bash" and text.index("```bash") < text.index("## ")
    assert "python -m dspy_anyscale demo" in install_and_run
    assert install_and_test.split("#")[0].strip().endswith("&& python -m pytest")


def test_ci_runs_the_readme_test_command_last() -> None:
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in commands if line and not line.startswith("#")]
    assert commands[-1] == "python -m pytest"


def test_readme_links_reach_existing_pages() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?:docs/)?[\w./-]+?)(?:#[\w-]+)?\)", text)
    assert "docs/index.md" in targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    listed = {Path(target).name for target in targets if target.startswith("docs/")}
    unlisted = [p.name for p in PAGES[1:] if p.name != "index.md" and p.name not in listed]
    assert not unlisted, f"docs pages missing from the README's More list: {unlisted}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """No broken link, anchor or page left out of the nav (.ci/run builds it too)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _outside_fences(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_block_is_runnable_marked_or_not_python(page: Path) -> None:
    for block in parse_page(page):
        check_block(block)


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p, ray=False)], ids=_page_id)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    _assert_examples_run(page, tmp_path, ray=False, timeout=PAGE_TIMEOUT_S)


@pytest.mark.ray
@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p, ray=True)], ids=_page_id)
def test_page_examples_run_on_ray(page: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[test,ray]'")
    _assert_examples_run(page, tmp_path, ray=True, timeout=RAY_PAGE_TIMEOUT_S)


# --- the harness itself: what it refuses and what fails ---------------------------------------


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return page


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("```python\nfor x in\n```\n", "not runnable Python"),
        ("<!-- docs: skip -->\n```python\nfor x in\n```\n", "say why"),
        ("```\nprint(1)\n```\n", "use python, text or bash"),
        ("```text\n>>> 1 + 1\n2\n```\n", "a Python session in a text block"),
        ("```python\nx = 1\n>>> x\n1\n```\n", "mixes code and '>>>'"),
        ("<!-- docs: later -->\n```python\nx = 1\n```\n", "unknown docs marker"),
        ("<!-- docs: ray -->\n\nSome prose.\n```python\nx = 1\n```\n", "right before"),
        ("<!-- docs: setup\nx = 1\n```python\nx\n```\n", "never closed"),
    ],
)
def test_unrunnable_or_unmarked_blocks_are_refused(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(DocsError, match=re.escape(complaint)):
        for block in parse_page(_page(tmp_path, text)):
            check_block(block)


def test_marked_and_non_python_blocks_pass(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "<!-- docs: skip, pseudo-code -->\n```python\nfor x in\n```\n\n```bash\nls\n```\n\n"
        "<!-- docs: ray -->\n<!-- docs: setup\nn = 2\n-->\n```python\n>>> n + 1\n3\n```\n",
    )
    blocks = parse_page(page)
    for block in blocks:
        check_block(block)
    assert [(b.lang, b.skip, b.ray) for b in blocks] == [
        ("python", "pseudo-code", False),
        ("bash", None, False),
        ("python", None, True),
    ]
    assert blocks[2].setup == (Snippet(line=12, code="n = 2", stub_only=False),)


@pytest.mark.parametrize(
    "value, shown, fits",
    [
        ([" Paris"], "[' Paris.\\n\\nThe United States has']", True),
        ("Paris", "['Paris']", False),
        ({"text": "a", "finish_reason": "stop", "extra": 1}, "{'text': 'b', 'finish_reason': 'length'}", True),
        ({"text": "a"}, "{'text': 'b', 'finish_reason': 'length'}", False),
        ({"choices": [{"text": 1}]}, "{'choices': [{'text': 'x'}]}", False),
        (3.2e-05, "3.195e-05", True),
        (0, "50.0", True),
        (None.__class__, "50.0", False),
        (True, "50.0", False),
        (doctest.Example("1", "1"), "Example(source='1')", True),
        (doctest.Example("1", "1"), "UsageRecord(..., status='ok')", False),
        ("x", "<html>", False),
    ],
)
def test_a_session_value_must_have_the_shape_shown(value: Any, shown: str, fits: bool) -> None:
    assert (shape_error(value, shown) is None) is fits


def test_an_example_that_fails_fails_its_page_and_names_the_line(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        """<!-- docs: stub
docs_stub.latency = 0.0
-->
```python
import os

base = os.environ["ANYSCALE_API_BASE"]
```

```python
>>> base.startswith("http://127.0.0.1:")
True
>>> len(base)
'a text'
```
""",
    )
    done = _run_in_subprocess(page, tmp_path, ray=False, timeout=PAGE_TIMEOUT_S)
    assert done.returncode == 1
    assert f"{page}:13: 'len(base)' gave" in done.stderr and "the page shows a str" in done.stderr


def test_an_example_that_calls_a_deprecated_api_fails_its_page(tmp_path: Path) -> None:
    page = _page(tmp_path, '```python\nimport warnings\n\nwarnings.warn("use new()", DeprecationWarning)\n```\n')
    done = _run_in_subprocess(page, tmp_path, ray=False, timeout=PAGE_TIMEOUT_S)
    assert done.returncode == 1 and "DeprecationWarning: use new()" in done.stderr


if __name__ == "__main__":
    # Run as a script, Python puts tests/ first on sys.path, where tests/ray/ (the Ray tests) would
    # shadow the real ray for the examples: take it out as a user's script would never see it.
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
    sys.exit(main())
