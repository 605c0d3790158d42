"""mmfast: fused kernels for training multimodal embedding models."""

from mmfast.backends.chunked import release_scratch
from mmfast.config import show_config
from mmfast.contrastive_loss import (
    ContrastiveLoss,
    ContrastiveLossFunction,
    ContrastiveLossOptions,
    contrastive_loss,
)
from mmfast.distillation_loss import (
    DistillationLoss,
    DistillationLossFunction,
    DistillationLossOptions,
    distillation_loss,
)
from mmfast.duplicate_ids import masked_candidate_counts
from mmfast.late_interaction_loss import LateInteractionLoss, LateInteractionLossOptions, late_interaction_loss
from mmfast.late_interaction_topk import LateInteractionTopK, LateInteractionTopkOptions, late_interaction_topk
from mmfast.pooling import Pooler, PoolingFunction, PoolingOptions, last_token_pool, mean_pool
from mmfast.sigmoid_loss import SigmoidLoss, SigmoidLossFunction, SigmoidLossOptions, sigmoid_loss
from mmfast.similarity_topk import SimilarityTopK, SimilarityTopkOptions, similarity_topk

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossFunction",
    "ContrastiveLossOptions",
    "contrastive_loss",
    "DistillationLoss",
    "DistillationLossFunction",
    "DistillationLossOptions",
    "distillation_loss",
    "masked_candidate_counts",
    "LateInteractionLoss",
    "LateInteractionLossOptions",
    "late_interaction_loss",
    "LateInteractionTopK",
    "LateInteractionTopkOptions",
    "late_interaction_topk",
    "Pooler",
    "PoolingFunction",
    "PoolingOptions",
    "last_token_pool",
    "mean_pool",
    "SigmoidLoss",
    "SigmoidLossFunction",
    "SigmoidLossOptions",
    "sigmoid_loss",
    "SimilarityTopK",
    "SimilarityTopkOptions",
    "similarity_topk",
    "release_scratch",
    "show_config",
]
