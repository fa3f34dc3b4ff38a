"""``python -m dspy_anyscale``: see :mod:`dspy_anyscale.cli`."""

import sys

from .cli import main

sys.exit(main())
