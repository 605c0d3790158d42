"""Evaluation: MMEB Precision@1, image-text retrieval R@K, SugarCrepe and text-to-video retrieval."""
