"""Naive PyTorch versions of every mmfast op: the float64 test oracles (the benchmarks' "reference")."""

from mmfast.reference.contrastive_loss import contrastive_loss_reference, directional_loss_reference
from mmfast.reference.distillation_loss import distillation_loss_reference
from mmfast.reference.late_interaction_loss import late_interaction_loss_reference, late_interaction_scores_reference
from mmfast.reference.pooling import last_token_index, pool_reference
from mmfast.reference.sigmoid_loss import sigmoid_loss_reference

__all__ = [
    "contrastive_loss_reference",
    "directional_loss_reference",
    "distillation_loss_reference",
    "last_token_index",
    "late_interaction_loss_reference",
    "late_interaction_scores_reference",
    "pool_reference",
    "sigmoid_loss_reference",
]
