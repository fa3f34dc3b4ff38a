"""Ray itself, imported once with a message saying how to install it when it is missing."""

from __future__ import annotations

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("dspy_anyscale.ray needs Ray Data: pip install 'dspy-anyscale[ray]'") from exc

__all__ = ["ray"]
