"""The public surface is exactly what ``__all__`` says, and importing it has no side effects."""

from __future__ import annotations

import subprocess
import sys

import dspy_anyscale
from dspy_anyscale import errors


def test_the_package_exports_exactly_all():
    public = {name for name in vars(dspy_anyscale) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(dspy_anyscale, name)).__name__ == "module"}
    assert public - modules == set(dspy_anyscale.__all__) - {"__version__"}
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
