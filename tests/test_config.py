"""Configuration: argument > environment > .env > a clear error; and no side effects at import."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dspy_anyscale
from dspy_anyscale._config import Endpoint, Timeout, normalize_base_url, resolve_endpoint, resolve_timeout
from dspy_anyscale._secrets import Secret
from dspy_anyscale.errors import ConfigurationError, MissingConfigurationError

from .conftest import MODEL, SECRET

BASE = "http://127.0.0.1:9/v1"


def write_env(path, **values):
    path.joinpath(".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def test_explicit_arguments_win_over_environment_and_dotenv(monkeypatch, tmp_path):
    write_env(tmp_path, ANYSCALE_API_BASE="http://dotenv/v1", ANYSCALE_API_KEY="dotenv-key")
    monkeypatch.setenv("ANYSCALE_API_BASE", "http://env/v1")
    monkeypatch.setenv("ANYSCALE_API_KEY", "env-key")
    endpoint = resolve_endpoint("http://arg/v1", "arg-key")
    assert (endpoint.base_url, endpoint.api_key.reveal()) == ("http://arg/v1", "arg-key")


def test_environment_wins_over_dotenv(monkeypatch, tmp_path):
    write_env(tmp_path, ANYSCALE_API_BASE="http://dotenv/v1", ANYSCALE_API_KEY="dotenv-key")
    monkeypatch.setenv("ANYSCALE_API_BASE", "http://env/v1")
    monkeypatch.setenv("ANYSCALE_API_KEY", "env-key")
    endpoint = resolve_endpoint()
    assert (endpoint.base_url, endpoint.api_key.reveal()) == ("http://env/v1", "env-key")
    assert endpoint.base_url_origin == "ANYSCALE_API_BASE"


def test_alias_base_url_in_environment_beats_dotenv(monkeypatch, tmp_path):
    write_env(tmp_path, ANYSCALE_API_BASE="http://dotenv/v1", ANYSCALE_API_KEY="k")
    monkeypatch.setenv("ANYSCALE_BASE_URL", "http://alias/v1")
    assert resolve_endpoint().base_url == "http://alias/v1"


def test_primary_name_wins_over_alias(monkeypatch):
    monkeypatch.setenv("ANYSCALE_API_BASE", "http://primary/v1")
    monkeypatch.setenv("ANYSCALE_BASE_URL", "http://alias/v1")
    monkeypatch.setenv("ANYSCALE_API_KEY", "k")
    assert resolve_endpoint().base_url == "http://primary/v1"


def test_dotenv_is_read_from_the_working_directory_without_touching_environ(tmp_path):
    write_env(tmp_path, ANYSCALE_API_BASE="http://dotenv/v1/", ANYSCALE_API_KEY="dotenv-key")
    endpoint = resolve_endpoint()
    assert (endpoint.base_url, endpoint.api_key.reveal()) == ("http://dotenv/v1", "dotenv-key")
    assert endpoint.api_key_origin == ".env: ANYSCALE_API_KEY"
    assert "ANYSCALE_API_KEY" not in os.environ and "ANYSCALE_API_BASE" not in os.environ


def test_dotenv_is_found_from_a_subdirectory(tmp_path, monkeypatch):
    write_env(tmp_path, ANYSCALE_API_BASE="http://dotenv/v1", ANYSCALE_API_KEY="k")
    sub = tmp_path / "notebooks" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert resolve_endpoint().base_url == "http://dotenv/v1"


def test_missing_base_url_names_the_variable_and_what_a_url_looks_like():
    with pytest.raises(MissingConfigurationError) as caught:
        resolve_endpoint(api_key="k")
    message = str(caught.value)
    for expected in (
        "ANYSCALE_API_BASE",
        "ANYSCALE_BASE_URL",
        "anyscaleuserdata.com/v1",
        "http://host:port/v1",
        ".env",
    ):
        assert expected in message


def test_missing_key_names_the_variable_and_the_no_auth_escape():
    with pytest.raises(MissingConfigurationError, match="ANYSCALE_API_KEY") as caught:
        resolve_endpoint(BASE)
    assert "api_key=''" in str(caught.value)


def test_empty_key_means_no_authorization():
    key = resolve_endpoint(BASE, "").api_key
    assert isinstance(key, Secret) and not key and key.reveal() == ""


# --- the key in one form: a Secret from where it is read to the Authorization header ------------

PACKAGE = Path(dspy_anyscale.__file__).resolve().parent


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def _functions_calling(tree: ast.Module, method: str) -> set[str]:
    """The (qualified) names of the functions in ``tree`` that call ``<something>.<method>()``."""
    found: set[str] = set()

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == method:
                found.add(scope or "<module>")
            visit(child, inner)

    visit(tree, "")
    return found


@pytest.mark.parametrize("origin", ["argument", "environment", ".env"])
def test_the_key_is_a_secret_from_where_it_is_read(monkeypatch, tmp_path, origin):
    if origin == "environment":
        monkeypatch.setenv("ANYSCALE_API_KEY", "sk-read-here-1234")
    elif origin == ".env":
        write_env(tmp_path, ANYSCALE_API_KEY="sk-read-here-1234")
    endpoint = resolve_endpoint(BASE, "sk-read-here-1234" if origin == "argument" else None)
    assert isinstance(endpoint.api_key, Secret) and endpoint.api_key.reveal() == "sk-read-here-1234"
    assert "sk-read-here-1234" not in repr(endpoint) and "sk-read-here-1234" not in str(endpoint)


def test_an_endpoint_refuses_a_bare_key_without_quoting_it():
    with pytest.raises(TypeError, match=r"Secret\(key\)") as caught:
        Endpoint(BASE, "sk-bare-key-5678")  # type: ignore[arg-type]
    assert "sk-bare-key-5678" not in str(caught.value)
    assert not Endpoint(BASE).api_key, "no key given: an empty Secret, no Authorization header"


def test_the_key_is_revealed_only_where_it_is_checked_sent_or_redacted():
    """One form: no module unwraps the key to carry it on (the old Endpoint held it as a str)."""
    allowed = {
        ("_config.py", "check_api_key"),  # its characters are checked, never quoted
        ("_transport/common.py", "build_headers"),  # the Authorization header: the one place it is sent
        ("_secrets.py", "redact"),  # the value to remove from error text
        ("_secrets.py", "Secrets.sent_with"),
    }
    revealed = {(name, function) for name, tree in _modules() for function in _functions_calling(tree, "reveal")}
    assert revealed <= allowed, sorted(revealed - allowed)


def test_nothing_outside_the_transport_reads_its_private_attributes():
    """The engine and the model list use the transport's public ``secrets`` and ``endpoint``."""
    reached: list[str] = []
    for name, tree in _modules():
        if name.startswith("_transport/"):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if owner_name == "transport":
                reached.append(f"{name}:{node.lineno} transport.{node.attr}")
    assert reached == []


def test_a_copy_that_rebuilds_the_connection_keeps_the_key_or_its_absence(stub):
    from dspy_anyscale import Anyscale

    keyed = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, cache=False)
    assert keyed.copy(use_chat_api=True)("hi") == ["echo: hi"]
    assert stub.posts()[-1].headers["Authorization"] == f"Bearer {SECRET}"
    stub.api_key = None  # a local server without auth
    try:
        keyless = Anyscale(MODEL, api_base=stub.base_url, api_key="", cache=False)
        assert keyless.copy(use_chat_api=True)("hi") == ["echo: hi"]
        assert "Authorization" not in stub.posts()[-1].headers
    finally:
        stub.api_key = SECRET
        keyed.close()


def test_missing_configuration_is_also_dspys_not_configured_error():
    from dspy.utils.exceptions import LMNotConfiguredError

    with pytest.raises(LMNotConfiguredError):
        resolve_endpoint()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("  https://svc-abc.anyscaleuserdata.com/v1//  ", "https://svc-abc.anyscaleuserdata.com/v1"),
    ],
)
def test_base_url_normalisation(given, expected):
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("127.0.0.1:8000/v1", "http(s) URL"),
        ("ftp://host/v1", "http(s) URL"),
        ("http://user:pw@host/v1", "credentials"),
        ("http://host/v1?key=abc", "query"),
        ("http://host/v1/chat/completions", "'http://host/v1'"),
        ("http://host/v1/completions", "not an endpoint"),
    ],
)
def test_bad_base_urls_are_refused_with_the_reason(given, fragment):
    with pytest.raises(ConfigurationError) as caught:
        normalize_base_url(given)
    assert fragment in str(caught.value)


def test_credentials_in_the_url_are_not_echoed():
    with pytest.raises(ConfigurationError) as caught:
        normalize_base_url("http://user:hunter2@host/v1")
    assert "hunter2" not in str(caught.value)


def test_the_retired_public_endpoint_warns():
    with pytest.warns(UserWarning, match="closed on 2024-08-01"):
        normalize_base_url("https://api.endpoints.anyscale.com/v1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [(30, Timeout(30.0, 30.0)), (2.5, Timeout(2.5, 2.5)), ((1, 60), Timeout(1.0, 60.0)), ([3, 4], Timeout(3.0, 4.0))],
)
def test_timeouts(given, expected):
    assert resolve_timeout(given) == expected


@pytest.mark.parametrize("bad", [None, 0, -1, float("inf"), "10", (1, 2, 3), True, (None, 5)])
def test_timeouts_are_always_on_and_positive(bad):
    with pytest.raises(ConfigurationError):
        resolve_timeout(bad)


def test_importing_the_package_has_no_side_effects(tmp_path):
    """No .env loaded into os.environ, no network, no configuration read at import."""
    write_env(tmp_path, ANYSCALE_API_KEY="from-dotenv", ANYSCALE_API_BASE="http://x/v1")
    code = (
        "import os, socket\n"
        "def refuse(*a, **k): raise AssertionError('network at import')\n"
        "socket.socket.connect = refuse\n"
        "before = dict(os.environ)\n"
        "import dspy_anyscale\n"
        "assert dict(os.environ) == before, 'environment changed at import'\n"
        "assert 'ANYSCALE_API_KEY' not in os.environ\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYSCALE_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
