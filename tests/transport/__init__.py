"""Tests of dspy_anyscale._transport: both HTTP stacks, faults, fork safety."""
