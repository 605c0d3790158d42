"""mmfast: fused kernels for training multimodal embedding models."""

from mmfast.contrastive_loss import (
    ContrastiveLoss,
    ContrastiveLossFunction,
    ContrastiveLossOptions,
    contrastive_loss,
)

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossFunction",
    "ContrastiveLossOptions",
    "contrastive_loss",
]
