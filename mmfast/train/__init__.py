"""mmfast.train: the reference trainer and evaluator for multimodal embedding models.

Built on `transformers.Trainer` and `peft`; the losses are mmfast's fused ops. This package is the
only part of mmfast that imports transformers: `import mmfast` never does.
"""
