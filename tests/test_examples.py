"""Every example in ``examples/`` runs end to end, as a user would run it, and reports its results.

Each runs in a subprocess in its ``--quick`` mode, shortened further where it has a knob (the
runs stay real: the same code paths, fewer steps), with ``--out`` a temporary folder. The
numbers are not checked (the examples' own full runs are shown in ``examples/README.md``); only
that each finishes cleanly, writes its figures and prints its result lines.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Every warning shown, even those Python hides by default (DeprecationWarning outside __main__),
# except the ones pyproject.toml ignores too: torch's own modules call TorchScript at import.
WARNINGS = [
    "-W",
    "always",
    "-W",
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
    "-W",
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
]

CASES = {
    "maml_fewshot.py": (
        ["--meta-steps", "20", "--test-tasks", "50", "--long-meta-steps", "2"],
        ["maml_fewshot.png"],
        ["5-way 1-shot accuracy after 5 steps", "5-way 5-shot accuracy after 5 steps", "MAML init"],
    ),
    "dataset_distillation.py": (
        ["--outer-steps", "20", "--long-outer-steps", "1"],
        ["dataset_distillation.png"],
        ["learned inner learning rate", "10 distilled images", "10 random real images"],
    ),
    "hypernetwork.py": (
        ["--steps", "60"],
        ["hypernetwork.png"],
        ["training pairs", "held-out (ordered) pairs, zero-shot"],
    ),
    "loss_landscape.py": (
        ["--grid", "9"],
        ["loss_landscape.png"],
        ["at the trained weights", "lowest on the grid", "grid's border"],
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_reports(script: str, tmp_path: Path) -> None:
    missing = [m for m in ("sklearn", "matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"the examples need {missing}: pip install scikit-learn matplotlib tqdm")
    extra, figures, lines = CASES[script]
    command = [sys.executable, *WARNINGS, str(EXAMPLES / script), "--quick", "--seed", "0"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Warning" not in done.stderr, done.stderr[-4000:]  # (tqdm is off without a terminal)
    for name in figures:
        assert (tmp_path / name).stat().st_size > 1000, name
    for line in lines:
        assert line in done.stdout, (line, done.stdout)
    assert "figure: " in done.stdout
