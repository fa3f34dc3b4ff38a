"""Every third-party module the package imports is declared in setup.cfg with a lower bound: in
``install_requires``, or in the extra of the only part of the package that imports it.

A module that is only installed because something else depends on it today (urllib3 under
requests, multidict under aiohttp) can vanish or change with that dependency's next release.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import dspy_anyscale

PACKAGE = Path(dspy_anyscale.__file__).resolve().parent
SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"  # the source tree's, also when testing an installed copy

# Where an import name and the distribution users install differ in a way metadata cannot tell:
# the card names the ``dspy-ai`` distribution, which installs ``dspy``.
DECLARED_AS = {"dspy": "dspy-ai"}
# Parts of the package that only run with an extra installed, and that extra.
EXTRA_ONLY = {
    "ray/": "ray",
    "limits/_ray.py": "ray",
    "tracing/": "otel",
    "runs/parquet.py": "parquet",
    "_services.py": "anyscale",
    "finetune/_anyscale_jobs.py": "anyscale",
    "finetune/_train_lora.py": "finetune",  # runs in the training interpreter, never imported
}


def _requirements(text: str) -> dict[str, str]:
    """``{normalised distribution name: requirement}`` of one setup.cfg list."""
    found = {}
    for line in text.strip().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0]
            found[_normalise(name)] = line
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    extras = {name: _requirements(value) for name, value in config["options.extras_require"].items()}
    return _requirements(config["options"]["install_requires"]), extras


def _third_party_imports() -> dict[str, set[str]]:
    """``{top-level module: the package files importing it}``, stdlib and the package itself aside."""
    imports: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "dspy_anyscale":
                    imports.setdefault(top, set()).add(where)
    return imports


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def _distributions(module: str) -> set[str]:
    if module in DECLARED_AS:
        return {DECLARED_AS[module]}
    return {_normalise(name) for name in _installed().get(module, [])}


def _extra_of(where: str) -> str | None:
    return next((extra for prefix, extra in EXTRA_ONLY.items() if where.startswith(prefix)), None)


IMPORTS = _third_party_imports()


def test_the_imports_are_found():
    assert {"requests", "urllib3", "certifi", "aiohttp", "multidict", "orjson", "dotenv", "dspy"} <= set(IMPORTS)


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_every_imported_module_is_declared_with_a_lower_bound(module):
    required, extras = _declared()
    distributions = _distributions(module)
    needed_by = {_extra_of(where) for where in IMPORTS[module]}
    if not distributions and None not in needed_by:
        # Only parts behind an extra import it, and that extra is not installed here (the clean
        # virtual environment CI installs the wheel into has the test extra only): the import name
        # is the distribution's name for every such module today.
        distributions = {_normalise(module)}
    assert distributions, f"{module} is imported but no installed distribution provides it"
    for extra in needed_by:
        declared = required if extra is None else {**required, **extras.get(extra, {})}
        place = "install_requires" if extra is None else f"install_requires or the {extra!r} extra"
        found = [declared[name] for name in distributions if name in declared]
        assert found, (
            f"{module} is imported by {sorted(IMPORTS[module])} but none of {sorted(distributions)} is in "
            f"setup.cfg's {place}"
        )
        # An exact pin is a lower bound too (torch: any other spec pulls a multi-GB CUDA build here).
        assert all(">=" in requirement or "==" in requirement for requirement in found), f"no lower bound: {found}"
