"""Fidelity harness: reference fake-quantizers (``baselines``), measures (``metrics``), held-out
and calibration data (``splits``), and the model-level evaluation tying them together (``harness``).
"""
