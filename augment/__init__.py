"""Data augmentation for few-shot training: batched image policies, text perturbations,
online vs materialised expansion, behind one registry (``create_augment``).

Importing the package is cheap; torch and torchvision load with the first policy lookup.
"""

from augment.registry import AugmentError, available, create_augment, register

__all__ = ["AugmentError", "available", "create_augment", "register"]
