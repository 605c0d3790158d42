"""Naive pooling: gather + F.normalize for the last token, a masked sum for the mean.

The test oracle (run in float64) and the benchmark baseline (run in the input dtype, as an MLLM
embedder's own code would)."""

from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] position of the last nonzero entry of each mask row (left, right or no padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # Real positions keep their index, padding gets -1; the max is the last real one.
    return torch.where(attention_mask != 0, positions, -1).amax(dim=1)


def pool_reference(hidden_states, attention_mask, *, mode: str = "last", normalize: bool = True):
    if mode == "last":
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        pooled = hidden_states[rows, last_token_index(attention_mask)]
    else:
        weights = (attention_mask != 0).to(hidden_states.dtype)
        pooled = (hidden_states * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
