"""Fine-tuning: one training loop with pluggable objectives (classify, contrastive pairs,
in-batch negatives), checkpoints, augmentation, and :func:`~embedkit.finetune` itself.
"""
