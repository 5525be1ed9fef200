"""examples/evolution_strategies.py runs in quick mode and learns: alone, and under torchrun."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("sklearn", "matplotlib", "tqdm"):  # the example's own dependencies
    pytest.importorskip(_module)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "evolution_strategies.py"
RESULT = re.compile(
    r"result: train accuracy (?P<train>[\d.]+), test accuracy (?P<test>[\d.]+) \(chance 0\.100\) "
    r"after \d+ generations of \d+ members \(\d+ parameters\) on (?P<world>\d+) process\(es\)"
)
LIMIT = 300  # seconds; a quick run takes ~25 s on 2 busy cores (most of it starting Python)


def _run(args: list[str], cwd: Path) -> tuple[str, str]:
    """Run ``args`` (its own process group, killed whole on timeout): (stdout, stderr)."""
    proc = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
        pytest.fail(f"{args} did not finish in {LIMIT} s:\n{out}\n{err}")
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{out}\n{err}"
    return out, err


def _check(stdout: str, out_dir: Path, world: int) -> None:
    found = RESULT.search(stdout)
    assert found, stdout
    assert int(found["world"]) == world
    # It learns: ~0.95 on held-out digits after the quick run's 100 generations; chance is 0.1.
    assert float(found["train"]) > 0.8, stdout
    assert float(found["test"]) > 0.8, stdout
    png = out_dir / "es_fitness.png"
    assert png.read_bytes().startswith(b"\x89PNG"), png
    assert f"figure: {png}" in stdout, stdout


def test_quick_run_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout, stderr = _run([sys.executable, str(EXAMPLE), "--quick", "--out", str(out)], tmp_path)
    _check(stdout, out, 1)
    assert "Warning" not in stderr, stderr  # (tqdm is off without a terminal)


def test_quick_run_under_torchrun_with_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    stdout, _ = _run([*launch, str(EXAMPLE), "--quick", "--out", str(out)], tmp_path)
    _check(stdout, out, 2)
