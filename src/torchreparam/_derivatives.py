"""Derivatives over one flat vector that users otherwise write by hand.

Each takes a function of the flat vector (typically ``lambda t: loss(r(x, flat_param=t), y)``)
and works with any module torchreparam wraps, BatchNorm in train mode included (they use
reverse-mode autograd, batched over vectors with ``is_grads_batched``, not ``torch.func``, so
modules may update their buffers in place). ``per_example_grads`` is the exception: it maps
``torch.func.grad`` over examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["gnvp", "hessian", "hvp", "jacobian", "per_example_grads"]


def _describe(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _leaf(flat_param: Tensor, create_graph: bool) -> Tensor:
    if not isinstance(flat_param, Tensor) or flat_param.dim() != 1:
        raise ValueError(
            f"flat_param must be a 1-D tensor (num_params,), got {_describe(flat_param)}"
        )
    if create_graph and flat_param.requires_grad:
        return flat_param  # differentiable w.r.t. the caller's graph
    return flat_param.detach().requires_grad_()


def _check_vectors(vectors: Tensor, numel: int) -> bool:
    """Whether ``vectors`` is a batch ``(k, num_params)`` (else ``(num_params,)``)."""
    if not isinstance(vectors, Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != numel:
        shape = _describe(vectors)
        raise ValueError(f"vectors must have shape ({numel},) or (k, {numel}), got {shape}")
    return vectors.dim() == 2


def _scalar(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor, got {_describe(value)}")
    return value.reshape(())


def hvp(
    loss_fn: Callable[[Tensor], Tensor],
    flat_param: Tensor,
    vectors: Tensor,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Hessian-vector products ``H @ v`` of a scalar loss at ``flat_param``.

    Args:
        loss_fn: maps a flat vector ``(num_params,)`` to a scalar loss.
        flat_param: the point ``(num_params,)``.
        vectors: ``(num_params,)`` or a batch ``(k, num_params)`` (computed in one batched pass).
        create_graph: keep the result differentiable w.r.t. ``flat_param`` (and ``vectors``).

    Returns:
        ``H @ v`` with the shape of ``vectors``.

    Example:
        >>> import torch
        >>> from torchreparam import hvp
        >>> hvp(lambda t: (t**3).sum(), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """
    theta = _leaf(flat_param, create_graph)
    batched = _check_vectors(vectors, theta.numel())
    with torch.enable_grad():
        loss = _scalar(loss_fn(theta), "loss_fn")
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        (out,) = torch.autograd.grad(
            grad, theta, vectors, create_graph=create_graph, is_grads_batched=batched
        )
    return out


def gnvp(
    output_fn: Callable[[Tensor], Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    flat_param: Tensor,
    vectors: Tensor,
) -> Tensor:
    """Gauss-Newton-vector products ``J^T H_L J v``.

    ``J`` is the Jacobian of ``output_fn`` at ``flat_param``; ``H_L`` the Hessian of
    ``loss_fn`` w.r.t. the outputs. Positive semi-definite for convex losses.

    Args:
        output_fn: maps a flat vector ``(num_params,)`` to the model's outputs.
        loss_fn: maps the outputs to a scalar loss.
        flat_param: the point ``(num_params,)``.
        vectors: ``(num_params,)`` or ``(k, num_params)``.

    Returns:
        ``J^T H_L J v`` with the shape of ``vectors``.
    """
    theta = _leaf(flat_param, False)
    batched = _check_vectors(vectors, theta.numel())
    with torch.enable_grad():
        out = output_fn(theta)
        probe = torch.zeros_like(out, requires_grad=True)
        (jt_probe,) = torch.autograd.grad(out, theta, probe, create_graph=True)  # J^T u
        (jv,) = torch.autograd.grad(jt_probe, probe, vectors, is_grads_batched=batched)  # J v
        leaf_out = out.detach().requires_grad_()
        loss = _scalar(loss_fn(leaf_out), "loss_fn")
        (grad_out,) = torch.autograd.grad(loss, leaf_out, create_graph=True)
        (hjv,) = torch.autograd.grad(grad_out, leaf_out, jv, is_grads_batched=batched)
        (result,) = torch.autograd.grad(out, theta, hjv, is_grads_batched=batched)
    return result


def hessian(
    loss_fn: Callable[[Tensor], Tensor], flat_param: Tensor, *, max_params: int = 10_000
) -> Tensor:
    """The full Hessian ``(num_params, num_params)`` of a scalar loss, for small models.

    Args:
        loss_fn: maps a flat vector ``(num_params,)`` to a scalar loss.
        flat_param: the point ``(num_params,)``.
        max_params: refuse larger vectors (the result needs ``num_params**2`` elements).

    Raises:
        ValueError: ``flat_param`` has more than ``max_params`` elements.
    """
    n = _leaf(flat_param, False).numel()  # (checks flat_param)
    if n > max_params:
        mib = n * n * flat_param.element_size() / 2**20
        size = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        raise ValueError(
            f"the Hessian of {n:,} parameters needs {n:,}^2 elements ({size}); use hvp "
            f"for products with vectors, or pass max_params={n} to build it anyway"
        )
    eye = torch.eye(n, dtype=flat_param.dtype, device=flat_param.device)
    return hvp(loss_fn, flat_param, eye)


def jacobian(fn: Callable[[Tensor], Tensor], flat_param: Tensor) -> Tensor:
    """The Jacobian of ``fn``'s output w.r.t. the flat vector (the NTK's building block).

    Args:
        fn: maps a flat vector ``(num_params,)`` to a tensor of any shape ``S``.
        flat_param: the point ``(num_params,)``.

    Returns:
        ``(*S, num_params)``; ``J @ J.T`` over the flattened outputs is the empirical NTK.
    """
    theta = _leaf(flat_param, False)
    with torch.enable_grad():
        out = fn(theta)
        eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        (jac,) = torch.autograd.grad(out.reshape(-1), theta, eye, is_grads_batched=True)
    return jac.reshape(*out.shape, theta.numel())


def per_example_grads(
    loss_fn: Callable[..., Tensor],
    flat_param: Tensor,
    *batch: Tensor,
    in_dims: int | tuple[int | None, ...] = 0,
) -> Tensor:
    """Gradients of a per-example loss for every example: a ``(batch, num_params)`` matrix.

    ``torch.func.vmap`` of ``torch.func.grad`` over the examples: modules must not update
    buffers in place (put BatchNorm in eval mode; per-example gradients through batch
    statistics are not defined anyway).

    Args:
        loss_fn: ``loss_fn(flat_param, *example)`` -> scalar, where ``example`` holds one
            example's tensors without their batch dimension (add it back inside if the
            module needs one: ``r(x[None], flat_param=t)``).
        flat_param: the point ``(num_params,)``.
        *batch: tensors with a leading batch dimension.
        in_dims: as ``torch.func.vmap``'s, for ``batch`` (default: every one batched on 0).

    Returns:
        ``(batch, num_params)``.
    """
    theta = _leaf(flat_param, False).detach()
    dims = (None, *((in_dims,) * len(batch) if not isinstance(in_dims, tuple) else in_dims))
    return torch.func.vmap(torch.func.grad(loss_fn), in_dims=dims)(theta, *batch)
