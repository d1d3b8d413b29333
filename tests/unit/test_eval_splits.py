"""Held-out and calibration data must never overlap."""

from rs_compile.eval.splits import (
    CALIBRATION_SEED,
    CALIBRATION_SENTENCES,
    HELDOUT_SEED,
    HELDOUT_SENTENCES,
)


def test_splits_are_disjoint_and_sized():
    assert len(set(HELDOUT_SENTENCES)) == len(HELDOUT_SENTENCES) == 40
    assert len(set(CALIBRATION_SENTENCES)) == len(CALIBRATION_SENTENCES) == 12
    assert not {s.lower() for s in HELDOUT_SENTENCES} & {s.lower() for s in CALIBRATION_SENTENCES}
    assert HELDOUT_SEED != CALIBRATION_SEED
