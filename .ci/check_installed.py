"""Check what users install: the wheel and sdist built from the checkout, not the checkout itself.

CI installs the checkout in editable mode, where a module or data file missing from the wheel (the
Portkey preload, ``py.typed``, a server module) still imports. .ci/run therefore builds the sdist and
the wheel (the wheel from the sdist, so building from the sdist is checked too), installs the wheel
into a clean virtual environment, and runs, from a folder outside the checkout:

    python .ci/check_installed.py --checkout DIR --dist DIR     # the smoke test below
    python -m pytest DIR/tests -p check_installed ...           # the unit tests, on the installed copy

As a pytest plugin (``-p check_installed`` with this folder on PYTHONPATH) it fails the run unless
every test imported the installed ``dspy_anyscale``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "dspy_anyscale"
# What building from the sdist needs, and what goes with it (MANIFEST.in).
SDIST_FILES = ["PKG-INFO", "setup.cfg", "pyproject.toml", "LICENSE", "README.md", "mkdocs.yml", "docs/index.md"]
SDIST_DIRS = ["tests", "docs", PACKAGE]
KEY = "sk-installed-check"


def package_files(root: Path) -> set[str]:
    """The package's files under ``root`` (a checkout or site-packages), as posix paths from ``root``."""
    found = set()
    for path in (root / PACKAGE).rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            found.add(path.relative_to(root).as_posix())
    return found


def installed_root() -> Path:
    """The site-packages of this interpreter: where the wheel was installed."""
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def check_imported_copy(checkout: Path) -> Path:
    """The installed package is the one imported, and it does not live in the checkout."""
    import dspy_anyscale

    location = Path(dspy_anyscale.__file__).resolve()
    if not location.is_relative_to(installed_root()) or location.is_relative_to(checkout.resolve()):
        raise SystemExit(
            f"dspy_anyscale was imported from {location}, not from the installed wheel in {installed_root()}: "
            "run from a folder outside the checkout, with the checkout not on sys.path"
        )
    return location


def check_wheel_has_every_file(checkout: Path) -> None:
    """Every module and data file of the checkout's package is installed (package_data in setup.cfg)."""
    missing = sorted(package_files(checkout) - package_files(installed_root()))
    if missing:
        raise SystemExit(f"the wheel lacks {missing}: add them to [options.package_data] in setup.cfg")


def check_sdist(dist: Path, checkout: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = set(SDIST_FILES) | package_files(checkout) | {d for d in SDIST_DIRS}
    wanted |= {path.relative_to(checkout).as_posix() for path in (checkout / "tests").glob("*.py")}
    missing = sorted(wanted - names)
    if missing:
        raise SystemExit(f"the sdist {sdist.name} lacks {missing}: add them to MANIFEST.in")


def check_wheel_archive(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    leaked = sorted(name for name in names if name.split("/")[0] in ("tests", "docs", "benchmarks", "scripts"))
    if leaked:
        raise SystemExit(f"the wheel {wheel.name} installs top-level {leaked}: limit [options.packages.find]")


def check_cli() -> None:
    done = subprocess.run([sys.executable, "-m", PACKAGE, "--help"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "usage" not in done.stdout.lower():
        raise SystemExit(f"python -m dspy_anyscale --help failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def check_a_call() -> str:
    """One direct call and one DSPy program call against the stub server the package ships."""
    import dspy

    from dspy_anyscale import Anyscale
    from dspy_anyscale.testing import StubServer

    with StubServer(api_key=KEY) as server:
        lm = Anyscale("stub-model", api_base=server.base_url, api_key=KEY, use_chat_api=True, cache=False)
        (text,) = lm("Say hello.")
        with dspy.context(lm=lm):
            answer = dspy.Predict("question -> answer")(question="Which ocean is the largest?").answer
        lm.close()
    if not text or answer != "answer for Which ocean is the largest?":
        raise SystemExit(f"the stub call answered {text!r} and {answer!r}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description="Smoke-test the installed wheel; see the module docstring.")
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--dist", type=Path, required=True, help="the folder holding the sdist and the wheel")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    location = check_imported_copy(args.checkout)
    check_wheel_has_every_file(args.checkout)
    check_sdist(args.dist, args.checkout)
    check_wheel_archive(args.dist)
    check_cli()
    check_a_call()
    print(f"installed copy OK: {location.parent} (every package file, CLI, a stub call; the sdist builds)")
    return 0


# --- as a pytest plugin -------------------------------------------------------------------------


def pytest_collection_finish(session: object) -> None:
    """After every test module is imported: they all use the installed copy."""
    import pytest

    module = sys.modules.get(PACKAGE)
    if module is None or not Path(module.__file__ or "").resolve().is_relative_to(installed_root()):
        where = getattr(module, "__file__", None)
        pytest.exit(f"the tests imported {PACKAGE} from {where}, not from the wheel in {installed_root()}", 4)


if __name__ == "__main__":
    sys.exit(main())
