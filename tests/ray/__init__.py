"""Tests of dspy_anyscale.ray: the runners, job-wide limits, the warm pool (marked ray)."""
