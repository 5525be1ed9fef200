"""The main job, ``python -m torchreparam demo``, runs, its checks hold, and it reads well."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from torchreparam.__main__ import main
from torchreparam._demo import run_demo

LABELS = ("machine", "wrap", "vector", "population", "threads", "failure", "resnet18", "same")
LABELS += ("trace", "maml")


def test_demo_checks_hold_and_lines_stay_short(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    result = run_demo(quick=True)
    out = capsys.readouterr().out
    assert result["ok"]
    assert result["only_flat"]
    assert result["equal"]
    assert result["theta_diff"] == 0.0  # the same kernels as functional_call
    assert result["population_diff"] < 1e-5
    assert result["threads_ok"]
    assert result["unchanged"]
    assert result["resnet_equal"]
    assert result["trace_diff"] < 1e-5
    assert result["grad_nonzero"] > 0
    assert result["param_numel"] == 11_689_512  # ResNet-18 with 1000 classes
    lines = out.splitlines()
    assert max(len(line) for line in lines) < 100, max(lines, key=len)
    for label in LABELS:
        assert any(line.startswith(f"  {label} ") for line in lines), label
    assert "median over 7 repeats" in out  # timings say what they are
    assert "original" not in out  # a newcomer has never seen the original project
    assert torch.get_num_threads() == threads  # put back


def test_demo_imports_no_optional_peer() -> None:
    code = (
        "import sys\n"
        "import torchreparam.__main__\n"
        "heavy = {'transformers', 'higher', 'benchmarks'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_command_line_help_and_errors() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--nope"])
    assert exit_info.value.code == 2


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchreparam", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--quick" in done.stdout
