"""The distribution: ``python -m build`` makes a wheel and an sdist that ``twine check`` accepts,
the wheel holds the library alone, and it works installed away from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build", reason="the test extras are not installed (pip install -e .[test])")

REPO = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"


def _run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend installed here (setuptools), no download
    done = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


def test_the_wheel_holds_the_library_alone(dist: Path) -> None:
    names = zipfile.ZipFile(_wheel(dist)).namelist()
    info = f"torchreparam-{VERSION}.dist-info/"
    outside = [n for n in names if not n.startswith(("torchreparam/", info))]
    assert outside == []
    package = {n.removeprefix("torchreparam/") for n in names if n.startswith("torchreparam/")}
    assert {"__init__.py", "__main__.py", "_demo.py", "_module.py", "py.typed"} <= package
    assert all("/" not in n and n.endswith((".py", ".typed")) for n in package), package
    assert not any("bench" in n for n in names)
    assert f"{info}entry_points.txt" in names


def test_twine_accepts_the_wheel_and_the_sdist(dist: Path) -> None:
    pytest.importorskip("twine")
    files = sorted(str(f) for f in dist.iterdir())
    assert len(files) == 2  # the wheel and the sdist
    done = _run(sys.executable, "-m", "twine", "check", "--strict", *files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def test_the_installed_wheel_works_away_from_the_checkout(dist: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    done = _run(
        sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
        "--target", str(target), str(_wheel(dist)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}  # torch comes from this interpreter
    code = (
        "import torch, torchreparam\n"
        "r = torchreparam.ReparamModule(torch.nn.Linear(3, 2))\n"
        "print(torchreparam.__file__, r.param_numel)\n"
    )
    done = _run(sys.executable, "-c", code, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    path, numel = done.stdout.split()
    assert Path(path).is_relative_to(target)  # the installed copy, not the checkout's
    assert numel == "8"
    done = _run(sys.executable, "-m", "torchreparam", "demo", "--help", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    done = _run(sys.executable, "-c", "import benchmarks", cwd=tmp_path, env=env)
    assert done.returncode != 0  # the benchmark suite stays in the repository
