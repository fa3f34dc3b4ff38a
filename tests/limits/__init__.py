"""Tests of dspy_anyscale.limits: the gate, the ledger, budgets through an LM."""
