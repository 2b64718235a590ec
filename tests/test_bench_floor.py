"""The benchmark measures against the floor app it carries: bench/floor_app.py is a
byte-identical copy of the reference floor app where that reference is present."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "bench" / "floor_app.py"


def test_bench_carries_a_byte_identical_copy_of_the_reference_floor_app():
    ours = ROOT / "bench" / "floor_app.py"
    assert ours.is_file(), "bench/floor_app.py is missing"
    if not REFERENCE.is_file():
        pytest.skip(f"no reference floor app at {REFERENCE} (a clone outside the development workspace)")
    assert ours.read_bytes() == REFERENCE.read_bytes()
