"""Argument checks shared by the ops' option dataclasses."""

from __future__ import annotations

import math
import numbers
import operator

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "torch", "reference")  # what each is: mmfast/backends/__init__.py
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_real(name: str, value: object, *, positive: bool = False) -> object:
    """A finite real number (positive if asked); bools and tensors are refused, numpy scalars taken.
    A symbolic value (torch.compile(dynamic=True) traces floats as SymFloat) cannot be checked."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: torch.compile(dynamic=True) traces them on symbolic floats.
    if not (-math.inf < value < math.inf) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a positive' if positive else 'a'} finite number, got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_backend_name(backend: object) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_ids(name: str, ids: object, length: int, what: str, device: torch.device) -> torch.Tensor:
    """A [length] integer tensor on `device` (`what` says what its entries identify)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids or None, got {type(ids).__name__}")
    if ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {ids.dtype}")
    if ids.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}] (one id per {what}), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but query is on {device}")
    return ids


def check_temperature(name: str, value: object, device: torch.device | None) -> object:
    """A temperature: a positive finite number, or a 0-d floating tensor on `device` (a learnable τ,
    with or without grad; `device` None: not checked yet). A tensor's value is checked only on the
    CPU and outside torch.compile, where reading it costs no device sync (the CPU kernels check it
    under torch.compile); on a GPU a τ <= 0 is the caller's to prevent (clamp it)."""
    if not isinstance(value, torch.Tensor):
        return check_real(name, value, positive=True)
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        check_temperature_value(name, value)
    return value


def check_temperature_value(name: str, value: torch.Tensor) -> None:
    """A CPU tensor temperature's value (reading it is free there)."""
    number = float(value.detach())
    if not (0 < number < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got tensor({number!r})")


def check_bias(name: str, value: object, device: torch.device | None) -> object:
    """A logit bias: a finite number, or a 0-d floating tensor on `device` (learnable, with or without
    grad; `device` None: not checked yet). A tensor's value is checked only on the CPU and outside
    torch.compile, as for check_temperature."""
    if not isinstance(value, torch.Tensor):
        return check_real(name, value)
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        number = float(value.detach())
        if not (-math.inf < number < math.inf):
            raise ValueError(f"{name} must be a finite number, got tensor({number!r})")
    return value


def check_embeddings(query, target, negatives, weight) -> torch.Tensor | None:
    """The embeddings of a loss over queries, their targets and shared hard negatives: query and
    target [B, D], negatives None, [B, K, D] or [M, D], one dtype and device; weight None or [B].
    Returns negatives flattened to [M, D] (a view) or None."""
    for name, t in (("query", query), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(t.shape)}")
    if query.shape[0] == 0:
        raise ValueError("query is empty: the batch needs at least one row (B >= 1)")
    if query.shape[1] == 0:
        raise ValueError("query has D = 0: the embedding dimension must be >= 1")
    if target.shape != query.shape:
        raise ValueError(f"target must have query's shape {tuple(query.shape)} [B, D], got {tuple(target.shape)}")
    tensors = [("query", query), ("target", target)]
    if negatives is not None:
        if not isinstance(negatives, torch.Tensor):
            raise TypeError(f"negatives must be a torch.Tensor or None, got {type(negatives).__name__}")
        if negatives.dim() == 3:
            if negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]:
                raise ValueError(
                    f"negatives [B, K, D] must have B = {query.shape[0]} and D = {query.shape[1]}, "
                    f"got {tuple(negatives.shape)}"
                )
        elif negatives.dim() == 2:
            if negatives.shape[1] != query.shape[1]:
                raise ValueError(f"negatives [M, D] must have D = {query.shape[1]}, got {tuple(negatives.shape)}")
        else:
            raise ValueError(f"negatives must be [B, K, D] or [M, D], got shape {tuple(negatives.shape)}")
        tensors.append(("negatives", negatives))
    for name, t in tensors:
        check_float_dtype(name, t)
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}: all inputs must share one dtype")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all inputs must share a device")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.shape != (query.shape[0],):
            raise ValueError(f"weight must have shape [B] = [{query.shape[0]}], got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if weight.device != query.device:
            raise ValueError(f"weight is on {weight.device} but query is on {query.device}")
    if negatives is None or negatives.dim() == 2:
        return negatives
    return negatives.reshape(-1, negatives.shape[-1])


def check_matryoshka(dims: object, weights: object) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """(dims, weights) as tuples: dims strictly increasing positive ints (d_1 < … < d_m), weights one
    finite real per dimension (default: all 1). Both None without Matryoshka."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        return None, None
    if isinstance(dims, (str, bytes, torch.Tensor)) or not hasattr(dims, "__iter__"):
        raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
    dims = tuple(check_positive_int("matryoshka_dims", d) for d in dims)
    if not dims:
        raise ValueError("matryoshka_dims must name at least one dimension")
    if any(lo >= hi for lo, hi in zip(dims, dims[1:], strict=False)):
        raise ValueError(f"matryoshka_dims must be strictly increasing, got {dims}")
    if weights is None:
        return dims, (1.0,) * len(dims)
    if isinstance(weights, (str, bytes, torch.Tensor)) or not hasattr(weights, "__iter__"):
        raise TypeError(f"matryoshka_weights must be a sequence of numbers, got {type(weights).__name__}")
    weights = tuple(float(check_real("matryoshka_weights", w)) for w in weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights has {len(weights)} entries but matryoshka_dims has {len(dims)}")
    return dims, weights


def check_matryoshka_dims_fit(dims: tuple[int, ...] | None, dim: int) -> None:
    """The largest prefix must fit the embeddings' D."""
    if dims is not None and dims[-1] > dim:
        raise ValueError(f"matryoshka_dims {dims}: the largest, {dims[-1]}, exceeds the embedding dimension D = {dim}")
