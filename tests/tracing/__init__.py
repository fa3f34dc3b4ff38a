"""Tests of dspy_anyscale.tracing: OpenTelemetry spans and metrics."""
