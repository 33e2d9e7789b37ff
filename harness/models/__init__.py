"""Models: loading checkpoints (``load``), the one resolver of model / template / reference / dtype /
device (``profiles``), and the embedded tiny builds (``tiny``).

Imports from ``harness.training`` (the tiny builds finetune) and the floors below it.
"""
