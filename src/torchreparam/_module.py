"""``ReparamModule``: the original torchreparam surface over the new mechanism."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._call import call, resolve
from ._checks import (
    check_buffers,
    same_device,
)
from ._classes import install
from ._hooks import global_hooks
from ._inject import CORE_KEY, Core, Writable, bind, buffer_site, call_bound, innermost
from ._layout import FlatLayout, Include, aliases_of, select_parameters
from ._population import Strategy, call_population, population_buffers
from ._replicate import replica_of
from ._state_dict import (
    as_given,
    as_wrapper_format,
    drop_managed_keys,
    end_flat_load,
    restore,
    snapshot,
)
from ._trace import Traced
from ._types import Buffers, InDims, Output

_tracing_state = torch._C._get_tracing_state
_compiling = torch.compiler.is_compiling


__all__ = ["ReparamModule"]


class ReparamModule(nn.Module):
    """Wrap ``module`` so that all its parameters live in one flat vector, ``flat_param``.

    The module's parameters become views of ``flat_param`` (shared storage), and the module can
    be called with any other flat vector, differentiably: ``r(x, flat_param=theta)``. The
    vector is ``torch.cat([p.reshape(-1) for p in module.parameters()])`` of the unwrapped
    module (tied parameters once), as in the original torchreparam.

    Calls are thread-safe (each thread, and each nested call, sees its own vector), never
    change the module's own weights, and leave the module as it was whatever they raise. (Its
    own buffers change only as a plain module's would: BatchNorm's running statistics in train
    mode, when no ``buffers`` are passed.)

    Args:
        module: the model to wrap. It is taken over in place: its managed parameters are
            removed and its classes replaced by subclasses that read ``flat_param``; it keeps
            working on its own (``module(x)``) and its ``state_dict()`` keeps its keys.
        include: which parameters go into ``flat_param``: ``None``/``"all"`` (every
            parameter; all must agree on ``requires_grad``), ``"trainable"`` (frozen ones stay
            ordinary parameters of the module) or a predicate ``include(name, param) -> bool``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``include`` has the wrong type.
        ValueError: the module is already wrapped, has lazy parameters, or its selected
            parameters mix dtypes, devices or ``requires_grad``.

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> r = ReparamModule(net)
        >>> r.param_numel, tuple(r.parameters()) == (r.flat_param,)
        (58, True)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(r(x), net(x))
        True
        >>> theta = torch.zeros(58, requires_grad=True)
        >>> r(x, flat_param=theta).shape
        torch.Size([3, 2])
    """

    flat_param: nn.Parameter
    module: nn.Module
    population_strategy: Strategy
    """How population calls run: ``"auto"`` (default: time the batched call against the loop on
    the first call of each signature, keep the faster), ``"vmap"``, ``"batched"`` (batched
    matrix products written out, for a ``Sequential`` of ``Linear`` layers and activations) or
    ``"loop"``."""
    population_chunk_size: int | None
    """Population calls run this many members at a time and join the outputs in order (bounds
    the peak memory of a large population); ``None`` (default): all at once."""
    population_randomness: str
    """Random draws in a population call: ``"different"`` (default: every member its own, as
    separate calls) or ``"same"`` (every member the first member's numbers)."""

    def __init__(self, module: nn.Module, *, include: Include = None) -> None:
        super().__init__()
        _check_wrappable(module)
        selected = select_parameters(module, include)
        requires_grad = _common_requires_grad(selected)
        device = same_device(selected) or _buffer_device(module)
        layout = FlatLayout.from_named_tensors(selected, aliases=aliases_of(module, selected))
        if not selected:  # nothing to hold: follow the buffers' floating dtype, if any
            layout = FlatLayout((), _buffer_dtype(module))
        del selected  # no references kept: install() frees each parameter once it is copied
        flat = torch.empty(layout.numel, dtype=layout.dtype, device=device)  # filled by install
        self.flat_param = nn.Parameter(flat, requires_grad=requires_grad)
        self.module = module
        sites = {name: buffer_site(module, name) for name, _ in module.named_buffers()}
        self._core = Core(layout, self, sites)
        self._traced: Traced | None = None
        self.population_strategy = "auto"
        self.population_chunk_size = None
        self.population_randomness = "different"
        self._plans: dict[Any, str] = {}  # "auto"'s choice per population call signature
        install(self._core, module)
        self.register_state_dict_post_hook(drop_managed_keys)
        self.register_load_state_dict_post_hook(end_flat_load)

    # ---- the original surface -----------------------------------------------------------
    @property
    def param_numel(self) -> int:
        """Number of elements of ``flat_param``."""
        return self._core.layout.numel

    @property
    def layout(self) -> FlatLayout:
        """The :class:`FlatLayout` of ``flat_param``: names, shapes, offsets, tied aliases."""
        return self._core.layout

    def __call__(self, *args: Any, **kwargs: Any) -> Output:
        # nn.Module's call path (``_wrapped_call_impl`` -> ``_call_impl`` -> ``forward``), two
        # frames shorter when it has nothing to do: no hooks, not compiled, not traced. The same
        # conditions as ``_call_impl``'s own fast path; anything else takes nn.Module's path.
        if (
            self._compiled_call_impl is None
            and not (
                self._forward_pre_hooks
                or self._forward_hooks
                or self._backward_pre_hooks
                or self._backward_hooks
                or global_hooks()
            )
            and not _tracing_state()
            and not _compiling()
        ):
            return self.forward(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(
        self,
        *inputs: object,
        flat_param: Tensor | None = None,
        buffers: Buffers = None,
        in_dims: InDims = None,
        **kwargs: object,
    ) -> Output:
        """Call the wrapped module with ``flat_param`` (and ``buffers``) in place of its own.

        Args:
            *inputs: positional inputs of the wrapped module.
            flat_param: ``(param_numel,)``, or a population ``(population, param_numel)``: the
                module is then called once per row and its outputs are stacked: each tensor on
                a new leading dimension, each other value (a float, a cache object) as the list
                of the members' values, ``None`` as ``None`` (strategy ``"vmap"`` refuses
                values other than tensors and ``None``). ``(1, num_params)`` is a population of
                one, except under ``nn.DataParallel``, which splits every argument: there such
                a row is the one vector it stands for (pass ``theta.expand(num_gpus, -1)``).
                ``None`` means the module's own ``flat_param`` (or the vector bound by an
                enclosing :meth:`unflattened_param` block).
            buffers: a tuple in ``module.buffers()`` order, or a dict ``{name: tensor}`` for
                some of them; ``None`` means the module's own. In train mode, BatchNorm updates
                the tensors it is given (and the module's own when none are given). For a
                population, each may be ``(population, *shape)``: one per member.
            in_dims: for a population only: ``None`` (inputs shared by all members, the
                default), ``0`` (every positional input has a leading population dimension), a
                tuple of ``0``/``None``, one per positional input, as ``torch.func.vmap``, or a
                dict ``{position or keyword name: 0 or None}`` (inputs not named are shared).
            **kwargs: keyword inputs of the wrapped module (shared by all members unless
                ``in_dims`` names them).

        Raises:
            TypeError, ValueError: ``flat_param``, ``buffers`` or ``in_dims`` do not fit the
                module (raised before anything is touched).
        """
        module: nn.Module = self._modules["module"]  # type: ignore[assignment]  # (self.module
        # goes through nn.Module.__getattr__: slower, on every call)
        if isinstance(flat_param, Tensor) and flat_param.dim() == 2:
            return call_population(
                self._core, module, inputs, kwargs, flat_param, buffers, in_dims,
                self.population_strategy, self._plans,
            )  # fmt: skip
        if in_dims is not None:
            raise ValueError(
                "in_dims applies to population calls only (flat_param of shape "
                f"(population, {self.param_numel})); drop it for a single vector"
            )
        traced = self._traced
        if traced is not None and not kwargs and traced.accepts(flat_param, inputs):
            return traced(flat_param, buffers, inputs)
        return call(self._core, module, inputs, kwargs, flat_param, buffers)

    def pure(
        self,
        *inputs: object,
        flat_param: Tensor | None = None,
        buffers: Buffers = None,
        in_dims: InDims = None,
        **kwargs: object,
    ) -> tuple[Output, dict[str, Tensor]]:
        """Like calling the wrapper, but mutates nothing: returns the updated buffers instead.

        The call runs on copies of ``buffers`` (or of the module's own); whatever the module
        updates in place (BatchNorm's running statistics in train mode) is updated in the
        copies, which are returned by name. For a population, every member gets its own copy
        and the returned buffers are ``(population, *shape)``. Suited to ``torch.func.grad``,
        ``jacrev``, ``jacfwd`` and ``hessian`` over ``flat_param``, and to code that must not
        see its tensors change. (Under ``torch.func.vmap``, BatchNorm in train mode refuses
        unbatched running statistics: for a population, pass ``flat_param`` of shape
        ``(population, num_params)``, which gives every member its own copy.)

        Returns:
            ``(output, {buffer name: updated buffer})``.

        Example:
            >>> import torch
            >>> from torchreparam import ReparamModule
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            >>> r = ReparamModule(net)
            >>> out, state = r.pure(torch.randn(8, 3))
            >>> state["1.num_batches_tracked"].item(), r.module[1].num_batches_tracked.item()
            (1, 0)
        """
        core = self._core
        population = (
            flat_param.shape[0]
            if isinstance(flat_param, Tensor) and flat_param.dim() == 2
            else None
        )
        start = core.bound_buffers() or core.own_buffers()
        if population is None:
            if in_dims is not None:
                raise ValueError("in_dims applies to population calls only; drop it")
            given = start if buffers is None else check_buffers(buffers, core.buffer_names, start)
            copies = [b.clone() for b in given]
            if flat_param is None and core.writes and innermost(core) is None:
                # the module's own weights as a vector like any other: the modules that write
                # their weights in place (max_norm) then write into a copy, not flat_param
                flat_param = self.flat_param
            params, _, guard = resolve(core, flat_param, None)
            # Bound as this very list: a buffer the module reassigns lands in it, returned below.
            out = call_bound(core, params, copies, self.module, inputs, kwargs, guard)
            return out, dict(zip(core.buffer_names, copies, strict=True))
        members, dims = population_buffers(core, start if buffers is None else buffers, population)
        assert members is not None  # start is a full list
        copies = [  # every member its own copy: (population, *shape)
            b.clone() if d == 0 else b.expand(population, *b.shape).clone()
            for b, d in zip(members, dims, strict=True)
        ]
        out = self(*inputs, flat_param=flat_param, buffers=copies, in_dims=in_dims, **kwargs)
        return out, dict(zip(core.buffer_names, copies, strict=True))

    def fresh_flat_param(self, n: int | None = None) -> Tensor:
        """Newly initialized flat vectors, drawn by the submodules' own ``reset_parameters()``.

        The module's own weights and buffers are not touched (the initializers write into the
        new vectors and into copies of the buffers); parameters of modules without
        ``reset_parameters`` keep their current values. For ensembles, evolution strategies and
        fresh inner-loop starts. The draws come from the global random number generators, one
        member after the other: ``torch.manual_seed`` makes them reproducible.

        Args:
            n: ``None`` for one vector; a count for a population of ``n`` independent
                initializations (each as a fresh model of the same architecture would get).

        Returns:
            ``(param_numel,)``, or ``(n, param_numel)`` when ``n`` is given; not requiring grad.

        Raises:
            ValueError: ``n`` is not a positive int.

        Example:
            >>> import torch
            >>> from torchreparam import ReparamModule
            >>> r = ReparamModule(torch.nn.Linear(3, 2))
            >>> theta = r.fresh_flat_param()
            >>> theta.shape, torch.equal(theta, r.flat_param)
            (torch.Size([8]), False)
            >>> r.fresh_flat_param(5).shape  # a population: one initialization per row
            torch.Size([5, 8])
        """
        if n is not None and (type(n) is not int or n < 1):
            raise ValueError(f"n must be None or a positive int (members to draw), got {n!r}")
        core = self._core
        with torch.no_grad():
            rows = self.flat_param.detach().expand(n or 1, -1).clone()  # (n, param_numel)
            for theta in rows.unbind(0):  # each row drawn as a fresh model would be
                copies = [b.clone() for b in core.own_buffers()]
                with bind(core, Writable(core.views(theta)), copies):
                    for module in self.module.modules():
                        reset = getattr(module, "reset_parameters", None)
                        if callable(reset):
                            reset()
        return rows[0] if n is None else rows

    @contextmanager
    def unflattened_param(self, flat_param: Tensor) -> Iterator[None]:
        """Within the block, calls of the module in this thread use ``flat_param``.

        Args:
            flat_param: ``(num_params,)``.
        """
        params, buffers, guard = resolve(self._core, flat_param, None)
        with bind(self._core, params, buffers, guard):
            yield

    @contextmanager
    def replaced_buffers(self, buffers: Buffers) -> Iterator[None]:
        """Within the block, calls of the module in this thread use ``buffers``.

        Args:
            buffers: a tuple in ``module.buffers()`` order, or a dict ``{name: tensor}``.
        """
        params, bound, guard = resolve(self._core, None, buffers, lazy_own=True)
        with bind(self._core, params, bound, guard):
            yield

    def trace(self, example_input: object, **trace_kwargs: object) -> ReparamModule:
        """Trace the module with TorchScript so that later calls with one vector run faster.

        The traced graph takes the flat vector and the buffers as inputs, so it follows
        ``flat_param`` and buffer updates. It is traced again, on first use, for every
        train/eval configuration of the submodules, so it follows ``.train()``/``.eval()``.
        Calls with keyword inputs or a population of vectors use the untraced path.

        Args:
            example_input: an input, or a tuple of positional inputs, of the wrapped module.
            **trace_kwargs: passed to ``torch.jit.trace`` (for example ``strict=False``).

        Returns:
            ``self``.
        """
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        traced = Traced(self._core, self.module, trace_kwargs)
        traced.prepare(self.flat_param, inputs)  # trace now, so that errors surface here
        self._traced = traced
        return self

    def _replicate_for_data_parallel(self) -> ReparamModule:
        # nn.DataParallel's replicas read their own broadcast flat_param and buffers: see
        # _replicate (a plain shallow copy would read the original's, on the first device).
        return replica_of(self)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"param_numel={self.param_numel}, dtype={self._core.layout.dtype}"

    def _apply(self, fn: Any, recurse: bool = True) -> ReparamModule:
        with self._core.converting():  # the module's root would otherwise delegate back here
            out = super()._apply(fn, recurse)
        self._core.follow_dtype()  # .double(), .half(), .to(dtype): the layout says so too
        return out

    # ---- state dicts --------------------------------------------------------------------
    def load_state_dict(
        self, state_dict: Mapping[str, object], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load the wrapper's own state dict, or one of the unwrapped module (original keys).

        Everything is checked before anything is copied: a mismatch raises
        :class:`StateDictMismatchError` listing every problem, and changes nothing. Should
        loading still fail past the checks (a load hook raising, say), the state is restored
        from a copy taken beforehand (so loading holds the state twice at its peak).

        Args:
            state_dict: ``{"flat_param": ..., "module.<buffer>": ...}`` as ``state_dict()``
                returns, or the unwrapped module's state dict (tied parameters under any of
                their names).
            strict: require exactly the expected keys (shapes are always checked).
            assign: as ``torch.nn.Module.load_state_dict``.

        Returns:
            torch's ``_IncompatibleKeys`` (missing and unexpected keys, for ``strict=False``),
            in the format given: for the unwrapped module's, the keys a plain module reports.

        Raises:
            StateDictMismatchError: keys or shapes do not match (a ValueError and RuntimeError).
            TypeError: ``state_dict`` is not a mapping.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        ours = as_wrapper_format(self, state_dict, strict)
        saved = snapshot(self)  # a copy of the state, for a failure past the checks (a hook)
        try:
            keys = super().load_state_dict(ours, strict=strict, assign=assign)
        except BaseException:
            restore(self, saved)
            self._core.loading_flat = False  # the post-hook that clears it did not run
            raise
        return as_given(self, state_dict, ours, keys)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # Managed parameters come in through flat_param: their own keys are not expected.
        self._core.loading_flat = prefix + "flat_param" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args)


# ---- helpers ----------------------------------------------------------------------------
def _check_wrappable(module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            "module is a TorchScript module, whose parameters live in C++; wrap the Python "
            "module before scripting it (ReparamModule.trace traces the wrapped call)"
        )
    if isinstance(module, ReparamModule):
        raise ValueError(
            "module is already a ReparamModule; use it directly (its .module is the model)"
        )
    for name, sub in module.named_modules():
        where = f"its submodule {name!r}" if name else "module"
        if isinstance(sub, ReparamModule):
            raise ValueError(
                f"{where} is a ReparamModule; wrap the whole unwrapped model once instead "
                "(a ReparamModule's .module is its unwrapped model)"
            )
        old = [h for h in sub._forward_pre_hooks.values() if isinstance(h, _OLD_REPARAM_HOOKS)]
        if old:
            kind = type(old[0]).__name__
            raise ValueError(
                f"{where} uses the old hook-based torch.nn.utils.{_OLD_HOOK_NAMES[kind]}, which "
                "stores the weight it computes on the module at every call: with different "
                "vectors in several threads (or under vmap) one call would read another's. "
                "Register torch.nn.utils.parametrizations."
                f"{_OLD_HOOK_NAMES[kind]} instead (the same computation) before wrapping"
            )
        if any(isinstance(h, BasePruningMethod) for h in sub._forward_pre_hooks.values()):
            raise ValueError(
                f"{where} is pruned with torch.nn.utils.prune, whose hook stores the masked "
                "weight on the module at every call: with different vectors in several threads "
                "(or under vmap) one call would read another's, and the module would keep a "
                "tensor of the caller's graph. Make the pruning permanent with "
                "prune.remove(module, name) before wrapping (flat_param then holds the masked "
                "weights), or express the mask as a parametrization"
            )
        if CORE_KEY in sub.__dict__:
            raise ValueError(
                f"{where} is already managed by a ReparamModule; wrap the whole model once, "
                "or keep using the existing wrapper"
            )


# The old reparametrizations, replaced in torch by torch.nn.utils.parametrizations.
_OLD_REPARAM_HOOKS = (WeightNorm, SpectralNorm)
_OLD_HOOK_NAMES = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}


def _common_requires_grad(selected: Mapping[str, nn.Parameter]) -> bool:
    frozen = [n for n, p in selected.items() if not p.requires_grad]
    if frozen and len(frozen) < len(selected):
        raise ValueError(
            f"module has trainable and frozen (requires_grad=False) parameters; frozen: "
            f"{frozen}. flat_param has one requires_grad flag, and torchreparam will not make "
            "frozen parameters trainable silently: pass include='trainable' to keep them out of "
            "flat_param (they stay ordinary frozen parameters), or unfreeze them first"
        )
    return not frozen or not selected


def _buffer_device(module: nn.Module) -> torch.device:
    return next((b.device for b in module.buffers()), torch.device("cpu"))


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    floats = (b.dtype for b in module.buffers() if b.is_floating_point())
    return next(floats, torch.get_default_dtype())
