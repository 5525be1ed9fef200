"""Running a case in a fresh Python process (a fresh heap, its own allocator settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .report import Table

__all__ = ["TUNED_MALLOC", "run_worker", "tables_from_json", "tables_to_json"]

# glibc: serve every allocation from the heap (no fresh mmap per large block), never trim it.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
_REPO_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding benchmarks/


def run_worker(module: str, args: Sequence[str], env: Mapping[str, str | None]) -> Any:
    """``python -m module *args`` in a fresh process; returns the JSON it printed last.

    Args:
        module: the worker module (``benchmarks.worker`` or a model's module).
        args: its command line.
        env: variables to set (a value of ``None`` removes the variable).

    Raises:
        RuntimeError: the worker failed; the message holds the end of its stderr.
    """
    environ = dict(os.environ)
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    path = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + path if path else "")
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=environ, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tables_to_json(tables: Sequence[Table]) -> str:
    """One line of JSON holding ``tables``."""
    return json.dumps([asdict(t) for t in tables])


def tables_from_json(data: Sequence[Mapping[str, Any]]) -> list[Table]:
    """The tables :func:`tables_to_json` wrote."""
    out = []
    for d in data:
        fields = dict(d)
        fields["headers"] = tuple(fields["headers"])
        fields["rows"] = [tuple(r) for r in fields["rows"]]
        out.append(Table(**fields))
    return out
