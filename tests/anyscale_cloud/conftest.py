"""The real ``anyscale`` SDK pointed at a local fake of its control plane (``fake_control_plane.py``).

The SDK finds its host in ``ANYSCALE_HOST`` and its token in ``ANYSCALE_CLI_TOKEN`` (before
``~/.anyscale/credentials.json``), as a user's environment would set them. Two things the SDK
keeps per process are reset around each test, so each test talks to its own fake: the host it
read at import (``anyscale.shared_anyscale_utils.conf.ANYSCALE_HOST``) and its cached
authenticated client and SDK singletons.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

# Without the [anyscale] extra (the clean-venv run of CI installs only [test]) there is nothing to test here.
collect_ignore_glob = [] if importlib.util.find_spec("anyscale") else ["test_*.py"]


def _forget_sdk_clients() -> None:
    import anyscale._private.sdk as sdk_registry
    import anyscale.authenticate as sdk_auth

    sdk_auth._auth_api_client_cache.value = None
    sdk_registry._LAZY_SDK_SINGLETONS.clear()


@pytest.fixture
def control_plane(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Any]:
    import anyscale.shared_anyscale_utils.conf as sdk_conf

    from .fake_control_plane import FakeControlPlane

    fake = FakeControlPlane().start()
    monkeypatch.setenv("ANYSCALE_HOST", fake.url)
    monkeypatch.setenv("ANYSCALE_CLI_TOKEN", fake.token)
    monkeypatch.setenv("HOME", str(tmp_path))  # no real ~/.anyscale/credentials.json is ever read
    monkeypatch.setattr(sdk_conf, "ANYSCALE_HOST", fake.url)
    _forget_sdk_clients()
    try:
        yield fake
    finally:
        _forget_sdk_clients()
        fake.stop()
    assert not fake.errors, f"the fake control plane failed inside: {fake.errors}"
