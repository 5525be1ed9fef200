"""What every case gets: the budget, the device, and how to probe contenders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .models import Model
from .peers import NotInstalled
from .timing import Budget, Timing, compare

__all__ = ["FULL", "SMOKE", "Context", "make_context", "probe"]


def _noop() -> None:
    return None


@dataclass(frozen=True)
class Context:
    """A run's settings: ``smoke`` (tiny budgets, small models), device, latency budget."""

    smoke: bool
    device: torch.device
    budget: Budget

    @property
    def sync(self) -> Callable[[], None]:
        """Waits for the device (``torch.cuda.synchronize`` on a GPU)."""
        return torch.cuda.synchronize if self.device.type == "cuda" else _noop

    def scaled(self, rounds: float = 1.0, block: float = 1.0, warmup: int | None = None) -> Budget:
        """The latency budget with ``rounds`` and ``block_s`` scaled (at least 2 rounds), and
        ``warmup`` calls if given (never more than the budget's)."""
        b = self.budget
        return Budget(
            rounds=max(2, round(b.rounds * rounds)),
            block_s=b.block_s * block,
            warmup=b.warmup if warmup is None else min(warmup, b.warmup),
        )

    def measure(
        self,
        contenders: Mapping[str, Callable[[], object]],
        baseline: str,
        budget: Budget | None = None,
    ) -> tuple[dict[str, Timing], dict[str, str]]:
        """Probe ``contenders``, then time those that work: (timings, name -> why not)."""
        ok, failed = probe(contenders, baseline)
        return compare(ok, baseline, budget or self.budget, self.sync), failed

    def on_device(self, model: Model) -> Model:
        """``model`` built on, and with inputs on, this context's device."""
        if self.device.type == "cpu":
            return model
        device, build = self.device, model.build

        def moved() -> nn.Module:
            return build().to(device)

        inputs = tuple(t.to(device) for t in model.inputs)
        return replace(model, build=moved, inputs=inputs, target=model.target.to(device))


def probe(
    contenders: Mapping[str, Callable[[], object]], baseline: str
) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Call each contender once: (those that worked, name -> why the others failed).

    Raises:
        RuntimeError: the baseline failed (nothing can be compared).
    """
    ok: dict[str, Callable[[], object]] = {}
    failed: dict[str, str] = {}
    for name, fn in contenders.items():
        try:
            fn()
        except NotInstalled as e:
            failed[name] = f"skipped: {e}"
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            failed[name] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        else:
            ok[name] = fn
    if baseline in failed:
        raise RuntimeError(f"the baseline {baseline!r} {failed[baseline]}")
    return ok, failed


FULL = Budget(rounds=25, block_s=0.02, warmup=3)
SMOKE = Budget(rounds=2, block_s=0.002, warmup=1)


def make_context(smoke: bool, device: str = "cpu") -> Context:
    """The context of a full run (25 rounds of 20 ms blocks) or a smoke run (tiny budgets)."""
    return Context(smoke=smoke, device=torch.device(device), budget=SMOKE if smoke else FULL)
