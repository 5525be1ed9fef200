"""The main job, ``python -m torchreparam demo``, runs and its checks hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from torchreparam.__main__ import main
from torchreparam._demo import run_demo


def test_demo_checks_hold(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_demo(quick=True)  # 64x64: train-mode BatchNorm needs >1 value per channel
    out = capsys.readouterr().out
    assert result["only_flat"]
    assert result["equal"]
    assert result["theta_diff"] == 0.0
    assert result["trace_diff"] < 1e-5
    assert result["grad_nonzero"] > 0
    assert result["grad_norm"] > 0
    assert result["param_numel"] == 11_689_512  # ResNet-18 with 1000 classes
    for word in ("wrap", "equal", "theta", "trace", "maml"):
        assert f"  {word} " in out


def test_command_line_help_and_errors() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchreparam", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--quick" in done.stdout
