"""The README's examples against the stand-in (llama.cpp's llama-server with SmolLM2-135M-Instruct),
the server its outputs were recorded on: the quickstart, the old HFModel surface and a real context
overflow caught as ContextWindowExceededError. tests/test_docs.py runs them against the stub too."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import SECRET
from ..test_docs import PAGE_TIMEOUT_S, ROOT, _run_in_subprocess, _tail

pytestmark = pytest.mark.integration


def test_readme_examples_run_on_the_stand_in(llama_server, tmp_path: Path) -> None:
    page = ROOT / "README.md"
    real_server = (llama_server.base_url, SECRET)
    done = _run_in_subprocess(page, tmp_path, ray=False, timeout=PAGE_TIMEOUT_S, real_server=real_server)
    assert done.returncode == 0, f"README.md: an example failed on the stand-in:\n{_tail(done.stderr)}"
