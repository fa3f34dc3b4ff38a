"""What importing dspy_anyscale adds to ``import dspy`` (target: under 60 ms).

    python benchmarks/import_time.py [--runs 15]

Measured on a regular (non-editable) install of this checkout into a temporary directory, with
bytecode caching on, as a user gets it: ``pip install -e`` adds an import hook of its own (a
meta-path finder that would shadow the copy, so the interpreters run with ``-S`` and the
site-packages on ``PYTHONPATH``), and ``PYTHONDONTWRITEBYTECODE=1`` makes every run recompile the
package. Fresh interpreters alternate
between the two commands so machine noise hits both alike; it prints the medians, their
difference, and the cumulative figure ``python -X importtime`` gives for the package alone.
"""

from __future__ import annotations

import argparse
import os
import re
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "import dspy"
WITH_PACKAGE = "import dspy, dspy_anyscale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as target:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, str(ROOT)], check=True
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPATH"] = os.pathsep.join([target, *site.getsitepackages()])
        python = [sys.executable, "-S"]  # no .pth files: no editable-install finder in front of the copy

        def once(code: str) -> float:
            started = time.perf_counter()
            subprocess.run([*python, "-c", code], check=True, env=env, cwd=target)
            return time.perf_counter() - started

        where = subprocess.run(
            [*python, "-c", "import dspy_anyscale; print(dspy_anyscale.__file__)"],
            env=env,
            cwd=target,  # not the checkout, whose dspy_anyscale/ would come first on sys.path
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert where.startswith(target), f"measured the wrong copy: {where}"
        once(WITH_PACKAGE)  # writes the bytecode, warms the file cache
        base, ours = [], []
        for _ in range(args.runs):
            base.append(once(BASELINE))
            ours.append(once(WITH_PACKAGE))
        trace = subprocess.run(
            [*python, "-X", "importtime", "-c", WITH_PACKAGE],
            env=env,
            cwd=target,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    cumulative = re.search(r"\|\s*(\d+)\s*\|\s*dspy_anyscale$", trace, re.MULTILINE)
    b, o = statistics.median(base), statistics.median(ours)
    print(f"import dspy                  {b * 1000:7.0f} ms (median of {args.runs})")
    print(f"import dspy, dspy_anyscale   {o * 1000:7.0f} ms")
    print(f"dspy_anyscale adds           {(o - b) * 1000:7.0f} ms (target < 60 ms)")
    if cumulative:
        print(f"-X importtime, dspy_anyscale {int(cumulative.group(1)) / 1000:7.0f} ms cumulative")


if __name__ == "__main__":
    main()
