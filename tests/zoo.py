"""The zoo: every kind of module torchreparam promises to handle, as data, and the checks.

Each :class:`Entry` says how to build a module and its example inputs, and what torchreparam
must do with it: ``"supported"`` (right numbers, values and gradients, in every kind of call)
or ``"refused"`` (a clear error of the documented type and message, before anything changes).
``tests/test_zoo.py`` runs every check on every entry; ``scripts/supported_modules.py`` runs
the same checks to generate the "supported modules" table of the docs.

References. A module is built twice from the same seed: once to be wrapped, once as the *plain
copy* (no ``deepcopy``: the old ``nn.utils.weight_norm`` cannot be deep-copied). For another
vector ``theta``, the plain copy gets ``theta``'s values (``p.copy_(...)`` under ``no_grad``) and
is called normally; its parameter gradients, concatenated in layout order, are the reference
for the gradient w.r.t. ``theta``. ``torch.func.functional_call`` is an additional reference
where it is valid (it is not for ``torch.utils.checkpoint``, nor for sparse gradients).

Known failures of the core are listed per entry and per check in ``Entry.xfail``: the tests
mark them ``xfail(strict=True)``, so they flip to a failure (to be removed here) when fixed.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import Tied, unchanged
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from torchreparam import ReparamModule

SEED = 1234
STRATEGIES = ("loop", "vmap", "auto")
POPULATION = 3
CHECKS = ("own", "other", "input_grad", "population", "threads", "no_trace", "copy")
"""The checks of a supported entry (``population`` runs once per strategy)."""


@dataclass(frozen=True)
class Entry:
    """One module of the zoo.

    Attributes:
        name: a short identifier (test ids).
        label: what the docs table shows.
        factory: builds the module; called under a fixed seed, so two calls give equal modules.
        inputs: builds the example positional inputs (also under a fixed seed).
        status: ``"supported"`` or ``"refused"``.
        error: for ``"refused"``: the documented exception type.
        message: for ``"refused"``: a fragment of the documented message.
        action: for ``"refused"``: what raises, given the wrapper (or, when ``None``, the
            refusal happens when wrapping ``factory()``).
        include: passed to ``ReparamModule``.
        train: the mode of single calls (populations and thread checks run in eval mode when
            the module has buffers, so that calls do not depend on their order).
        vmap: ``True``, or why the ``"vmap"`` strategy does not apply (it must then raise).
        functional_call: ``True``, or why ``torch.func.functional_call`` is no reference.
        warnings: torch warnings (``filterwarnings`` specs) that this module's calls raise.
        pauses: extra places where the thread check pauses a call (beyond every submodule's
            forward pre-hooks and hooks): ``install(module, pause) -> undo``.
        xfail: check name -> ``"core: reason"`` for the checks the core currently fails.
        notes: what the table says besides the status.
    """

    name: str
    label: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    status: str = "supported"
    error: type[BaseException] | None = None
    message: str = ""
    action: Callable[[ReparamModule], Any] | None = None
    include: Any = None
    train: bool = True
    vmap: bool | str = True
    functional_call: bool | str = True
    warnings: tuple[str, ...] = ()
    pauses: tuple[Callable[[nn.Module, Callable[[], None]], Callable[[], None]], ...] = ()
    xfail: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def __repr__(self) -> str:
        return f"Entry({self.name})"


# ---- modules ----------------------------------------------------------------------------
class WithHooks(nn.Module):
    """Forward pre-hooks and hooks that read the weights, on a submodule and on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 3)
        self.a.register_forward_pre_hook(_scale_input)
        self.b.register_forward_hook(_shift_output)
        self.register_forward_hook(_gate_output)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _scale_input(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (args[0] * module.weight.mean(),)


def _shift_output(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out + module.weight.sum(1)


def _gate_output(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out * module.a.bias.sum().tanh()


class HuggingFaceStyle(nn.Module):
    """Reads ``next(self.parameters())`` and ``.device``/``.dtype`` as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, idx: Tensor) -> Tensor:
        first = next(self.parameters())
        mask = torch.ones(idx.shape, device=self.device, dtype=self.dtype)
        hidden = self.embed(idx) * mask[..., None] + 0 * first.sum()
        return self.head(hidden).to(first.dtype)


class Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint`` between two plain layers."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.out(torch.tanh(h))


class WithBuffers(nn.Module):
    """A registered buffer used in forward, and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("scale", torch.rand(3) + 0.5)
        self.register_buffer("shift", torch.randn(3), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale + self.shift


class Symmetric(nn.Module):
    """A user-defined parametrization (the example of torch's parametrize tutorial)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def _quiet(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A factory that does not warn (deprecations and lazy-module notices at construction)."""

    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory()

    return build


def _mlp(*sizes: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b, dtype=dtype), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _frozen() -> nn.Module:
    net = _mlp(5, 6, 3)
    net[0].requires_grad_(False)
    return net


class _MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)).double())


def _embedding_max_norm() -> nn.Module:
    net = nn.Embedding(10, 4, max_norm=1.0)
    with torch.no_grad():
        net.weight.mul_(3.0)  # every row above the max norm: renormalized when looked up
    return net


def _register_after_wrapping(r: ReparamModule) -> None:
    parametrize.register_parametrization(r.module[0], "weight", Symmetric())


def _pause_in_flatten_parameters(
    module: nn.Module, pause: Callable[[], None]
) -> Callable[[], None]:
    """Pause an RNN's call after it stored ``_flat_weights``, before it uses them."""
    original = type(module).flatten_parameters

    def flatten_parameters() -> None:
        original(module)
        pause()

    module.__dict__["flatten_parameters"] = flatten_parameters
    return lambda: module.__dict__.pop("flatten_parameters")


def _randn(*shape: int) -> Callable[[], tuple[Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


def _ints(high: int, *shape: int) -> Callable[[], tuple[Tensor, ...]]:
    return lambda: (torch.randint(0, high, shape),)


_RNN_VMAP = "torch: no batching rule for the fused RNN kernels (aten::lstm, gru, rnn_tanh)"
_COMPLEX_WARNING = "ignore:Complex modules are a new feature:UserWarning"
_VMAP_FALLBACK = "ignore:There is a performance drop:UserWarning"  # torch: no batching rule
ZOO: tuple[Entry, ...] = (
    # ---- dense layers -------------------------------------------------------------------
    Entry("linear", "`Linear`", lambda: nn.Linear(5, 3), _randn(4, 5)),
    Entry("linear_nobias", "`Linear(bias=False)`", lambda: nn.Linear(5, 3, bias=False), _randn(4, 5)),
    Entry("bilinear", "`Bilinear`", lambda: nn.Bilinear(3, 4, 2), lambda: (torch.randn(4, 3), torch.randn(4, 4)), warnings=(_VMAP_FALLBACK,)),
    Entry("mlp_float64", "`Linear` stack, `float64`", lambda: _mlp(5, 6, 3, dtype=torch.float64), lambda: (torch.randn(4, 5, dtype=torch.float64),)),
    Entry("prelu", "`PReLU`", lambda: nn.Sequential(nn.Linear(5, 4), nn.PReLU(4)), _randn(4, 5)),
    Entry(
        "complex", "`Linear` stack, `complex64` parameters",
        lambda: nn.Sequential(nn.Linear(3, 4, dtype=torch.complex64), nn.Linear(4, 2, dtype=torch.complex64)),
        lambda: (torch.randn(4, 3, dtype=torch.complex64),),
        warnings=(_COMPLEX_WARNING,),
    ),
    # ---- convolutions -------------------------------------------------------------------
    Entry("conv1d", "`Conv1d`", lambda: nn.Conv1d(3, 4, 3, padding=1), _randn(2, 3, 7)),
    Entry("conv2d_nobias", "`Conv2d(bias=False)`", lambda: nn.Conv2d(3, 4, 3, bias=False), _randn(2, 3, 6, 6)),
    Entry("conv2d_groups", "`Conv2d(groups=2, stride=2)`", lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), _randn(2, 4, 7, 7)),
    Entry("conv3d", "`Conv3d`", lambda: nn.Conv3d(2, 3, 2), _randn(1, 2, 4, 4, 4)),
    Entry("conv_transpose1d", "`ConvTranspose1d(stride=2)`", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), _randn(2, 3, 5)),
    Entry("conv_transpose2d_nobias", "`ConvTranspose2d(bias=False)`", lambda: nn.ConvTranspose2d(3, 4, 3, bias=False), _randn(2, 3, 4, 4)),
    Entry("conv_transpose3d", "`ConvTranspose3d`", lambda: nn.ConvTranspose3d(2, 2, 2), _randn(1, 2, 3, 3, 3)),
    # ---- normalization ------------------------------------------------------------------
    Entry(
        "batchnorm1d", "`BatchNorm1d` (train mode: running statistics)",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), _randn(6, 5),
    ),
    Entry(
        "batchnorm2d", "`Conv2d` + `BatchNorm2d` (train mode)",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), _randn(2, 3, 5, 5),
    ),
    Entry("batchnorm2d_eval", "`BatchNorm2d` (eval mode)", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _randn(2, 3, 5, 5), train=False),
    Entry(
        "batchnorm_buffers_only", "`BatchNorm2d(affine=False)` (buffers only, empty `flat_param`)",
        lambda: nn.BatchNorm2d(3, affine=False), _randn(2, 3, 4, 4),

    ),
    Entry("layernorm", "`LayerNorm`", lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), _randn(4, 5)),
    Entry("layernorm_nobias", "`LayerNorm(bias=False)`", lambda: nn.LayerNorm(6, bias=False), _randn(4, 6)),
    Entry("groupnorm", "`GroupNorm`", lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)), _randn(2, 4, 3, 3)),
    Entry(
        "instancenorm", "`InstanceNorm1d(affine=True, track_running_stats=True)`",
        lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), _randn(3, 4, 6),
    ),
    # ---- recurrent ----------------------------------------------------------------------
    Entry("rnn", "`RNN` (2 layers)", lambda: nn.RNN(3, 4, num_layers=2), _randn(5, 2, 3), vmap=_RNN_VMAP, pauses=(_pause_in_flatten_parameters,)),
    Entry(
        "lstm", "`LSTM` (2 layers, bidirectional)",
        lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True), _randn(5, 2, 3),
        vmap=_RNN_VMAP, pauses=(_pause_in_flatten_parameters,),
    ),
    Entry(
        "lstm_proj", "`LSTM(proj_size=2, batch_first=True)`",
        lambda: nn.LSTM(3, 5, proj_size=2, batch_first=True), _randn(2, 5, 3),
        warnings=("ignore:LSTM with projections is not supported with oneDNN:UserWarning",),
        vmap=_RNN_VMAP, pauses=(_pause_in_flatten_parameters,),
    ),
    Entry(
        "gru", "`GRU` (2 layers, bidirectional, `batch_first`)",
        lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), _randn(2, 5, 3),
        vmap=_RNN_VMAP, pauses=(_pause_in_flatten_parameters,),
    ),
    Entry("lstm_cell", "`LSTMCell`", lambda: nn.LSTMCell(3, 4), _randn(2, 3), vmap="torch: no batching rule for aten::lstm_cell"),
    # ---- attention ----------------------------------------------------------------------
    Entry(
        "multihead_attention", "`MultiheadAttention`",
        lambda: nn.MultiheadAttention(8, 2), lambda: (torch.randn(5, 2, 8),) * 3,
    ),
    Entry(
        "multihead_attention_kdim", "`MultiheadAttention(kdim, vdim, add_bias_kv, batch_first)`",
        lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=4, add_bias_kv=True, batch_first=True),
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 7, 6), torch.randn(2, 7, 4)),
    ),
    Entry(
        "transformer_encoder", "`TransformerEncoder` (2 layers)",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        ),
        _randn(2, 5, 8), warnings=(_VMAP_FALLBACK,),
    ),
    Entry(
        "transformer_encoder_eval", "`TransformerEncoder` (eval mode: torch's fused fast path)",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        ),
        _randn(2, 5, 8), train=False,
        vmap="torch: under vmap, the eval-mode encoder layer takes its fused kernel, which has no derivative",
        warnings=(_VMAP_FALLBACK,),
    ),
    # ---- embeddings ---------------------------------------------------------------------
    Entry("embedding", "`Embedding(padding_idx=0)`", lambda: nn.Embedding(10, 4, padding_idx=0), _ints(10, 3, 4)),
    Entry("embedding_bag", "`EmbeddingBag(mode='mean')`", lambda: nn.EmbeddingBag(10, 4, mode="mean"), _ints(10, 3, 4), warnings=(_VMAP_FALLBACK,)),
    Entry(
        "embedding_sparse", "`Embedding(sparse=True)`", lambda: nn.Embedding(10, 4, sparse=True), _ints(10, 3, 4),
        functional_call="torch: the backward of a view of a flat vector cannot take a sparse gradient",
        vmap="torch: vmap does not support sparse gradients",
        notes="the gradient w.r.t. the dense `flat_param` is the densified sparse gradient",
    ),
    Entry(
        "embedding_max_norm", "`Embedding(max_norm=1.0)`", _embedding_max_norm, _ints(10, 3, 4),
        warnings=(_VMAP_FALLBACK,),
        notes="calls with `theta` renormalize a copy: the caller's vector is never written; "
        "calls with the module's own weights renormalize them, as the plain module does",
    ),
    # ---- parametrizations ---------------------------------------------------------------
    Entry(
        "parametrize_weight_norm", "`parametrizations.weight_norm` (registered before wrapping)",
        lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)), _randn(4, 5),
        warnings=(_VMAP_FALLBACK,),
    ),
    Entry(
        "parametrize_orthogonal", "`parametrizations.orthogonal` (registered before wrapping)",
        lambda: nn.Sequential(parametrizations.orthogonal(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3)), _randn(4, 5),
    ),
    Entry(
        "parametrize_spectral_norm", "`parametrizations.spectral_norm` (train mode: power iteration buffers)",
        lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)), _randn(4, 5),
    ),
    Entry(
        "parametrize_custom", "`parametrize.register_parametrization` (a user's `nn.Module`)",
        lambda: _custom_parametrized(), _randn(4, 5),
    ),
    Entry(
        "old_weight_norm", "`nn.utils.weight_norm` (the old, hook-based one; deprecated by torch)",
        _quiet(lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3))), _randn(4, 5),
        status="refused", error=ValueError,
        message="its submodule '0' uses the old hook-based torch.nn.utils.weight_norm, which stores the weight it computes on the module at every call",
        notes="its pre-forward hook stores the computed weight on the module at every call (not per thread); use torch.nn.utils.parametrizations.weight_norm",
    ),
    Entry(
        "old_spectral_norm", "`nn.utils.spectral_norm` (the old, hook-based one)",
        _quiet(lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3))), _randn(4, 5),
        status="refused", error=ValueError,
        message="its submodule '0' uses the old hook-based torch.nn.utils.spectral_norm",
        notes="as the old weight_norm; use torch.nn.utils.parametrizations.spectral_norm",
    ),
    Entry(
        "pruned", "`nn.utils.prune.l1_unstructured` (hook-based; before wrapping)",
        lambda: nn.Sequential(prune.l1_unstructured(nn.Linear(5, 4), "weight", amount=0.5), nn.Tanh(), nn.Linear(4, 3)), _randn(4, 5),
        status="refused", error=ValueError,
        message="its submodule '0' is pruned with torch.nn.utils.prune, whose hook stores the masked weight on the module at every call",
        notes="as the old weight_norm; prune.remove(module, 'weight') before wrapping makes the pruning permanent (entry below)",
    ),
    Entry(
        "pruned_removed", "`nn.utils.prune`, made permanent with `prune.remove` before wrapping",
        lambda: nn.Sequential(prune.remove(prune.l1_unstructured(nn.Linear(5, 4), "weight", amount=0.5), "weight"), nn.Tanh(), nn.Linear(4, 3)), _randn(4, 5),
    ),
    # ---- structure ----------------------------------------------------------------------
    Entry("tied", "Tied weights (embedding and output projection, GPT-2 style)", Tied, _ints(10, 4, 3)),
    Entry(
        "shared_layer", "One submodule used twice",
        lambda: (lambda lin: nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(5, 2)))(nn.Linear(5, 5)), _randn(4, 5),
    ),
    Entry(
        "nested", "Nested containers (`ModuleDict`, `ModuleList`, `Sequential`)",
        lambda: _Nested(), _randn(4, 5),
    ),
    Entry("buffers", "Registered buffers (persistent and not) used in `forward`", WithBuffers, _randn(4, 5)),
    Entry(
        "frozen", "Frozen parameters, `include=\"trainable\"`", _frozen, _randn(4, 5), include="trainable",
        notes="the frozen ones stay ordinary parameters of the module",
    ),
    Entry("hooks", "Forward pre-hooks and hooks that read the weights (they see `theta`)", WithHooks, _randn(4, 5)),
    Entry(
        "huggingface_style", "`next(self.parameters())`, `.device`, `.dtype` in `forward` (Hugging Face style)",
        HuggingFaceStyle, _ints(10, 3, 4),
        notes="`r.module.parameters()` yields the views of the bound vector",
    ),
    Entry(
        "checkpoint", "`torch.utils.checkpoint(use_reentrant=False)` inside `forward`",
        lambda: Checkpointed(use_reentrant=False), _randn(4, 5),
        vmap="torch: the recomputation runs during backward, outside vmap (tensor escaped from vmap)",
        functional_call="torch.func.functional_call gives the same wrong gradient (recomputation reads the module's own weights)",
    ),
    Entry(
        "checkpoint_reentrant", "`torch.utils.checkpoint(use_reentrant=True)` inside `forward`",
        lambda: Checkpointed(use_reentrant=True), _randn(4, 5),
        functional_call="torch.func.functional_call gives the same wrong gradient (recomputation reads the module's own weights)",
        vmap="torch: use_reentrant=True checkpoint is an autograd.Function without a vmap rule",
    ),
    # ---- refused ------------------------------------------------------------------------
    Entry(
        "lazy", "Lazy modules before their first forward pass", _quiet(lambda: nn.Sequential(nn.LazyLinear(3))), _randn(4, 5),
        status="refused", error=ValueError, message="module has uninitialized lazy parameters (0.bias, 0.weight); run one forward pass",
    ),
    Entry(
        "frozen_mixed", "Frozen and trainable parameters, default `include`", _frozen, _randn(4, 5),
        status="refused", error=ValueError, message="module has trainable and frozen (requires_grad=False) parameters; frozen: ['0.weight', '0.bias']",
    ),
    Entry(
        "mixed_dtypes", "Parameters of several dtypes", _MixedDtypes, _randn(4, 5),
        status="refused", error=ValueError, message="parameters must share one dtype to live in one flat vector",
    ),
    Entry(
        "parametrize_after", "A parametrization registered after wrapping", lambda: _mlp(5, 5, 3), _randn(4, 5),
        status="refused", error=ValueError, action=_register_after_wrapping,
        message="does not have a parameter, a buffer, or a parametrized element with name 'weight'",
        notes="torch's own error (the managed weight is no longer a registered parameter); "
        "register parametrizations before wrapping",
    ),
)  # fmt: skip


def _custom_parametrized() -> nn.Module:
    net = _mlp(5, 5, 3)
    parametrize.register_parametrization(net[0], "weight", Symmetric())
    return net


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                "first": nn.Sequential(nn.Linear(5, 6), nn.Tanh()),
                "rest": nn.ModuleList(
                    [nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(2)]
                ),
            }
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks["first"](x)
        for block in self.blocks["rest"]:
            h = h + block(h)
        return self.head(h)


class Composite(nn.Module):
    """Many zoo parts in one model (faults and endurance): Conv2d, BatchNorm2d, Linear,
    LayerNorm, MultiheadAttention, a weight-norm parametrization, hooks reading weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = parametrizations.weight_norm(nn.Linear(8, 3))
        self.proj.register_forward_hook(_shift_by_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (B, 25, 4)
        h = self.norm(self.proj(h))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def _shift_by_bias(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out + 0.1 * module.bias


def composite(train: bool = False) -> tuple[ReparamModule, Tensor]:
    """A wrapped :class:`Composite` (eval mode unless ``train``) and an input batch."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        module = Composite()
        with torch.no_grad():
            module.bn.running_mean.uniform_(-0.5, 0.5)
            module.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 3, 5, 5)
    return ReparamModule(module.train(train)), x


BY_NAME = {entry.name: entry for entry in ZOO}
SUPPORTED = tuple(e for e in ZOO if e.status == "supported")
REFUSED = tuple(e for e in ZOO if e.status == "refused")


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread while a test module runs (restored after): these models are tiny,
    and on a small shared machine a team of OpenMP threads waits for cores on every op (tens of
    times slower); the threads the tests start themselves are what they are about."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- building ---------------------------------------------------------------------------
def make(entry: Entry, train: bool | None = None) -> nn.Module:
    """A fresh module of ``entry`` (equal on every call: built under a fixed seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        module = entry.factory()
    return module.train(entry.train if train is None else train)


def example(entry: Entry) -> tuple[Any, ...]:
    with torch.random.fork_rng():
        torch.manual_seed(SEED + 1)
        return entry.inputs()


def wrap(entry: Entry, train: bool | None = None) -> ReparamModule:
    return ReparamModule(make(entry, train), include=entry.include)


def has_buffers(module: nn.Module) -> bool:
    return any(True for _ in module.buffers())


def quiet_mode(entry: Entry) -> bool:
    """Train/eval for populations and threads: eval when buffers could be updated."""
    return False if has_buffers(make(entry)) else entry.train


def vectors(r: ReparamModule, *batch: int, seed: int = 7, scale: float = 0.1) -> Tensor:
    """Vectors near the module's own (some parametrizations need that), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    flat = r.flat_param.detach()
    noise = torch.randn(*batch, flat.numel(), generator=g, dtype=flat.dtype)
    return (flat + scale * noise).requires_grad_(r.flat_param.requires_grad)


# ---- outputs ----------------------------------------------------------------------------
def leaves(out: Any) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def cotangents(out: Any, seed: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(t.shape, generator=g, dtype=t.dtype)
        if t.is_floating_point() or t.is_complex()
        else t
        for t in leaves(out)
    ]


def loss(out: Any, cots: list[Tensor]) -> Tensor:
    """A real scalar that depends on every differentiable output."""
    terms = [
        (t * c).real.sum()
        for t, c in zip(leaves(out), cots, strict=True)
        if t.requires_grad and (t.is_floating_point() or t.is_complex())
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def assert_outputs(actual: Any, expected: Any, what: str, exact: bool = False) -> None:
    a, e = leaves(actual), leaves(expected)
    assert len(a) == len(e), f"{what}: {len(a)} output tensors, expected {len(e)}"
    for i, (x, y) in enumerate(zip(a, e, strict=True)):
        kw = {"rtol": 0, "atol": 0} if exact else {}
        torch.testing.assert_close(x, y, **kw, msg=lambda m, i=i: f"{what}, output {i}: {m}")


def plain_grads(plain: nn.Module, r: ReparamModule) -> Tensor:
    """The plain module's parameter gradients, concatenated in ``r``'s layout order."""
    named = dict(plain.named_parameters(remove_duplicate=False))
    parts = []
    for entry in r.layout.entries:
        grad = named[entry.name].grad
        if grad is None:
            grad = torch.zeros(entry.shape, dtype=r.flat_param.dtype)
        elif grad.is_sparse:
            grad = grad.to_dense()
        parts.append(grad.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=r.flat_param.dtype)


def plain_copy(
    entry: Entry, r: ReparamModule, theta: Tensor, train: bool | None = None
) -> nn.Module:
    """A fresh plain module holding ``theta``'s values."""
    plain = make(entry, train)
    named = dict(plain.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for e in r.layout.entries:
            named[e.name].copy_(theta.detach()[e.slice].view(e.shape))
    return plain


def grad_of(theta: Tensor) -> Tensor:
    return torch.zeros_like(theta) if theta.grad is None else theta.grad


# ---- the checks of a supported entry ----------------------------------------------------
def check_own(entry: Entry) -> None:
    """Own weights: outputs, ``flat_param.grad`` and the state afterwards equal the plain module's."""
    r, plain, args = wrap(entry), make(entry), example(entry)
    out, expected = r(*args), plain(*args)
    assert_outputs(out, expected, "own weights", exact=True)
    assert_outputs(
        r.module(*args), plain(*args), "the unwrapped module called directly", exact=True
    )
    cots = cotangents(out)
    if r.param_numel and r.flat_param.requires_grad:
        loss(out, cots).backward()
        loss(expected, cots).backward()
        torch.testing.assert_close(
            r.flat_param.grad, plain_grads(plain, r), msg=lambda m: f"flat_param.grad: {m}"
        )
    _assert_state(r.module.state_dict(), plain.state_dict(), "state after own calls")


def check_other(entry: Entry) -> None:
    """Another vector: values and gradients equal the plain copy's (and functional_call's);
    theta is not modified; the module's own weights are unchanged."""
    r, args = wrap(entry), example(entry)
    own = r.flat_param.detach().clone()
    theta = vectors(r)
    before, version = theta.detach().clone(), theta._version
    plain = plain_copy(entry, r, theta)
    out, expected = r(*args, flat_param=theta), plain(*args)
    assert_outputs(out, expected, "theta vs the plain copy")
    assert theta._version == version, "theta was modified in place (version bumped)"
    assert torch.equal(theta.detach(), before), "theta's values changed"
    assert torch.equal(r.flat_param.detach(), own), "the module's own weights changed"
    _assert_state(_buffers_of(r.module), _buffers_of(plain), "buffers after the call")
    if not (r.param_numel and theta.requires_grad):
        return
    cots = cotangents(out)
    loss(out, cots).backward()
    loss(expected, cots).backward()
    torch.testing.assert_close(
        grad_of(theta),
        plain_grads(plain, r),
        msg=lambda m: f"grad w.r.t. theta vs the plain copy: {m}",
    )
    assert r.flat_param.grad is None, "a call with theta put gradient into r.flat_param.grad"
    assert theta._version == version, "backward modified theta (version bumped)"
    assert torch.equal(theta.detach(), before), "backward modified theta's values"
    if entry.functional_call is True:
        twin, t2 = make(entry), before.clone().requires_grad_()
        ref = torch.func.functional_call(twin, r.layout.unflatten(t2), args)
        assert_outputs(out, ref, "theta vs functional_call")
        loss(ref, cots).backward()
        torch.testing.assert_close(
            grad_of(theta), grad_of(t2), msg=lambda m: f"grad vs functional_call: {m}"
        )


def check_input_grad(entry: Entry) -> None:
    """Gradients w.r.t. the inputs only (dataset distillation, adversarial examples), with a
    vector that needs none: the plain copy's; nothing reaches ``flat_param.grad``."""
    r, args = wrap(entry), example(entry)
    if not any(a.is_floating_point() or a.is_complex() for a in args):
        pytest.skip("integer inputs")
    theta = vectors(r).detach()
    mine = tuple(a.clone().requires_grad_(a.is_floating_point() or a.is_complex()) for a in args)
    theirs = tuple(a.clone().requires_grad_(a.is_floating_point() or a.is_complex()) for a in args)
    plain = plain_copy(entry, r, theta)
    out, expected = r(*mine, flat_param=theta), plain(*theirs)
    assert_outputs(out, expected, "theta (no grad) vs the plain copy")
    cots = cotangents(out)
    loss(out, cots).backward()
    loss(expected, cots).backward()
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a.requires_grad:
            torch.testing.assert_close(
                a.grad, b.grad, msg=lambda m, i=i: f"grad w.r.t. input {i}: {m}"
            )
    assert r.flat_param.grad is None, "a call with theta put gradient into r.flat_param.grad"


def check_population(entry: Entry, strategy: str) -> None:
    """P vectors: equal to the loop of single calls and to P plain copies, values and grads."""
    mode = quiet_mode(entry)
    r, args = wrap(entry, train=mode), example(entry)
    r.population_strategy = strategy  # type: ignore[assignment]
    state = _state(r)
    thetas = vectors(r, POPULATION)
    before = thetas.detach().clone()
    if strategy == "vmap" and entry.vmap is not True:

        def forward_and_backward() -> None:
            out = r(*args, flat_param=thetas)
            loss(out, cotangents(out)).backward()

        with pytest.raises(RuntimeError):  # torch: no batching rule, or no derivative
            forward_and_backward()
        _assert_state(_state(r), state, "state after a refused vmap call")
        return
    if strategy == "auto":  # the first call chooses a plan, the next ones follow it
        _let_auto_choose_vmap(r, args, thetas)
    out = r(*args, flat_param=thetas)
    singles = before.clone().requires_grad_(thetas.requires_grad)
    loop = [r(*args, flat_param=t) for t in singles.unbind(0)]
    plains = [plain_copy(entry, r, t, train=mode) for t in before]
    expected = [p(*args) for p in plains]
    for i in range(POPULATION):
        member = [t[i] for t in leaves(out)]
        assert_outputs(member, loop[i], f"member {i} vs its single call")
        assert_outputs(member, expected[i], f"member {i} vs its plain copy")
    assert torch.equal(thetas.detach(), before), "the population's vectors were modified"
    _assert_state(_state(r), state, "state after population calls")
    if not (r.param_numel and thetas.requires_grad):
        return
    cots = cotangents(out)
    loss(out, cots).backward()
    for i in range(POPULATION):
        member_cots = [c[i] for c in cots]
        loss(loop[i], member_cots).backward()
        loss(expected[i], member_cots).backward()
        torch.testing.assert_close(
            thetas.grad[i],
            plain_grads(plains[i], r),
            msg=lambda m, i=i: f"member {i} grad vs its plain copy: {m}",
        )
    torch.testing.assert_close(
        thetas.grad, grad_of(singles), msg=lambda m: f"grads vs the loop of single calls: {m}"
    )
    assert r.flat_param.grad is None, "a population call put gradient into r.flat_param.grad"


def _let_auto_choose_vmap(r: ReparamModule, args: tuple[Any, ...], thetas: Tensor) -> None:
    """Make "auto"'s first call, then make its plan "vmap" wherever it may choose it: where
    vmap works, forward and (when gradients are needed) backward. Timings decide between the
    two, so a test must not leave that choice to them."""
    trial = thetas.detach().clone().requires_grad_(thetas.requires_grad)
    r(*args, flat_param=trial)
    r.population_strategy = "vmap"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = [t for t in leaves(r(*args, flat_param=trial)) if t.requires_grad]
            if out and trial.requires_grad:
                torch.autograd.grad([t.real.sum() for t in out], trial, allow_unused=True)
    except Exception:  # as the trial of "auto"
        return  # "auto" may not choose vmap here
    finally:
        r.population_strategy = "auto"
    for key in r._plans:
        r._plans[key] = "vmap"


def check_threads(entry: Entry) -> None:
    """Interleaved calls: a call paused at any point of its forward (every submodule's pre-hook
    and hook, and the entry's own pause points) while another thread makes a whole call with
    another vector still gets its own results, as does the other call."""
    mode = quiet_mode(entry)
    r, args = wrap(entry, train=mode), example(entry)
    a, b = vectors(r, seed=11, scale=0.5), vectors(r, seed=12, scale=0.5)
    serial_a, serial_b = r(*args, flat_param=a), r(*args, flat_param=b)
    points = 0
    for install in _pause_points(r.module, entry):
        out_a, out_b, paused = _interleave(r, args, a, b, install)
        points += paused
        assert_outputs(out_b, serial_b, "the call made while another was paused")
        assert_outputs(out_a, serial_a, "the paused call, resumed after another call")
    assert points > 0, "no pause point was reached"


def check_no_trace(entry: Entry) -> None:
    """After calls with other vectors (single and population), the module holds nothing of
    them: every tensor it keeps (state dict and plain tensor attributes) is as before."""
    mode = quiet_mode(entry)
    r, args = wrap(entry, train=mode), example(entry)
    r(*args)  # modules may cache derived tensors on their first call
    state, attributes = _state(r), _tensor_attributes(r.module)
    out = r(*args, flat_param=vectors(r))
    if r.param_numel and r.flat_param.requires_grad:
        loss(out, cotangents(out)).backward()
    r.population_strategy = "vmap" if entry.vmap is True else "loop"
    r(*args, flat_param=vectors(r, POPULATION))
    _assert_state(_state(r), state, "state after calls with other vectors")
    after = _tensor_attributes(r.module)
    assert after.keys() == attributes.keys()
    for key, value in attributes.items():
        assert torch.equal(after[key], value), f"{key} changed: it holds a result of another vector"


def check_copy(entry: Entry) -> None:
    """deepcopy and pickle of the wrapper, after calls, give the same results (each where torch
    can copy the plain module: it pickles no parametrized module, and deep-copies no module of
    the old ``nn.utils.weight_norm``)."""
    mode = quiet_mode(entry)
    args = example(entry)
    ways = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}
    plain = make(entry, train=mode)
    plain(*args)
    usable = {}
    for name, way in ways.items():
        try:
            way(plain)
        except Exception:  # torch's limits: RuntimeError, pickling errors
            continue
        usable[name] = way
    if not usable:
        pytest.skip("torch can neither deep-copy nor pickle the plain module")
    r = wrap(entry, train=mode)
    theta = vectors(r)
    r(*args)
    r(*args, flat_param=theta)
    for name, way in usable.items():
        clone = way(r)
        assert_outputs(clone(*args), r(*args), f"{name}: own weights", exact=True)
        assert_outputs(
            clone(*args, flat_param=theta), r(*args, flat_param=theta), f"{name}: theta", exact=True
        )


def check_refused(entry: Entry) -> None:
    """The documented error, and nothing changed."""
    assert entry.error is not None
    args = example(entry)
    match = re.escape(entry.message)
    if entry.action is None:
        module = make(entry)
        classes = [type(m) for m in module.modules()]
        params = dict(module.named_parameters())
        state = {k: v for k, v in module.state_dict().items() if not nn.parameter.is_lazy(v)}
        state = {k: v.clone() for k, v in state.items()}
        with pytest.raises(entry.error, match=match):
            ReparamModule(module, include=entry.include)
        assert [type(m) for m in module.modules()] == classes, "a refused module's classes changed"
        assert dict(module.named_parameters()) == params, "a refused module's parameters changed"
        assert all(type(p) is type(params[n]) for n, p in module.named_parameters())
        now = {k: v for k, v in module.state_dict().items() if k in state}
        _assert_state(now, state, "a refused module's state")
        with torch.random.fork_rng():  # lazy modules initialize on their first call
            torch.manual_seed(SEED)
            out = module(*args)
            torch.manual_seed(SEED)
            expected = make(entry)(*args)
        assert_outputs(out, expected, "a refused module's outputs", exact=True)
        return
    r = wrap(entry)
    with unchanged(r, *args), pytest.raises(entry.error, match=match):
        entry.action(r)
    assert_outputs(r(*args), make(entry)(*args), "the wrapper after the refusal", exact=True)


CHECK_FUNCTIONS: dict[str, Callable[..., None]] = {
    "own": check_own,
    "other": check_other,
    "input_grad": check_input_grad,
    "population": check_population,
    "threads": check_threads,
    "no_trace": check_no_trace,
    "copy": check_copy,
}


# ---- helpers ----------------------------------------------------------------------------
def _buffers_of(module: nn.Module) -> dict[str, Tensor]:
    return dict(module.named_buffers())


def _state(r: ReparamModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in r.state_dict().items()}


def _assert_state(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    assert list(actual) == list(expected), f"{what}: keys {list(actual)} != {list(expected)}"
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key} differs"


def _tensor_attributes(module: nn.Module) -> dict[str, Tensor]:
    """Plain tensor attributes (not parameters, buffers or submodules), also inside lists."""
    skip = {"_parameters", "_buffers", "_modules"}
    out = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            items = value if isinstance(value, list | tuple) else [value]
            for i, item in enumerate(items):
                if name not in skip and isinstance(item, Tensor):
                    out[f"{prefix}.{name}[{i}]"] = item.detach().clone()
    return out


def _pause_points(module: nn.Module, entry: Entry) -> Iterator[Callable[..., Callable[[], None]]]:
    for _, sub in module.named_modules():
        yield lambda pause, sub=sub: sub.register_forward_pre_hook(lambda *_: pause()).remove
        yield lambda pause, sub=sub: sub.register_forward_hook(lambda *_: pause()).remove
        for extra in entry.pauses:
            if isinstance(sub, nn.RNNBase):
                yield lambda pause, sub=sub, extra=extra: extra(sub, pause)


def _interleave(
    r: ReparamModule,
    args: tuple[Any, ...],
    a: Tensor,
    b: Tensor,
    install: Callable[..., Callable[[], None]],
) -> tuple[Any, Any, bool]:
    """Thread A calls with ``a`` and pauses at one point; meanwhile this thread calls with ``b``."""
    reached, resume = threading.Event(), threading.Event()
    state: dict[str, Any] = {"paused": False}
    ident: list[int] = []

    def pause() -> None:
        if ident and threading.get_ident() == ident[0] and not state["paused"]:
            state["paused"] = True
            reached.set()
            resume.wait(timeout=30)

    def thread_a() -> None:
        ident.append(threading.get_ident())
        try:
            state["out"] = r(*args, flat_param=a)
        except BaseException as error:  # reported by the caller
            state["error"] = error
        finally:
            reached.set()

    undo = install(pause)
    try:
        worker = threading.Thread(target=thread_a)
        worker.start()
        reached.wait(timeout=30)
        out_b = r(*args, flat_param=b)
        resume.set()
        worker.join(timeout=30)
    finally:
        undo()
    if "error" in state:
        raise state["error"]
    return state["out"], out_b, state["paused"]


def describe_failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


def known_failure(entry: Entry, check: str) -> str | None:
    """The xfail reason of ``check`` (``"population:vmap"`` also matches ``"population"``)."""
    return entry.xfail.get(check) or entry.xfail.get(check.split(":")[0])


def checks_of(entry: Entry) -> tuple[str, ...]:
    """The checks run on ``entry``: the names ``run_check`` takes."""
    if entry.status == "refused":
        return ("refused",)
    return (
        "own",
        "other",
        "input_grad",
        *(f"population:{s}" for s in STRATEGIES),
        "threads",
        "no_trace",
        "copy",
    )


def run_check(entry: Entry, check: str) -> None:
    name, _, strategy = check.partition(":")
    if name == "refused":
        check_refused(entry)
    elif name == "population":
        check_population(entry, strategy)
    else:
        CHECK_FUNCTIONS[name](entry)
