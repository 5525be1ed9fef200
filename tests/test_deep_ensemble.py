"""examples/deep_ensemble.py runs in quick mode: members learn, the population equals its members
trained one by one, the best member goes through plain torch.save/load, the figure is written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("sklearn", "matplotlib"):  # the example's own dependencies
    pytest.importorskip(_module)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deep_ensemble.py"
RESULT = re.compile(
    r"result: ensemble of (?P<k>\d+) accuracy (?P<ens>[\d.]+) ECE (?P<ece>[\d.]+); best member "
    r"accuracy (?P<best>[\d.]+) ECE [\d.]+; members mean accuracy [\d.]+; training [\d.]+x"
)
AGREE = re.compile(r"the two agree on (?P<share>[\d.]+) of the members' test predictions")


def test_quick_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = RESULT.search(proc.stdout)
    assert found, proc.stdout
    assert int(found["k"]) == 4
    # The best members reach ~0.96 on held-out digits after 3 epochs; chance is 0.1.
    assert float(found["ens"]) > 0.85, proc.stdout
    assert float(found["best"]) > 0.85, proc.stdout
    agree = AGREE.search(proc.stdout)
    assert agree, proc.stdout
    assert float(agree["share"]) > 0.97, proc.stdout  # (float32 rounding, amplified by training)
    assert "saved and loaded by plain torch as Sequential: same True" in proc.stdout
    png = tmp_path / "deep_ensemble.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert f"figure: {png}" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
