"""Scoring: the shared-pass ``EvalContext``, the forward/generation primitives, the retain-model
reference, the metric suite of a task and the open-unlearning export.

Imports from ``harness.models`` and the floors below it.
"""
