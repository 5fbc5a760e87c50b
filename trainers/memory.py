"""Memory: gradient checkpointing applied to a built model, and ZeRO's model-state arithmetic.

``zero_model_state_bytes`` is the formula of the ZeRO paper (Rajbhandari et al. 2020, section
3 and figure 1): per worker, Ψ parameters cost P·Ψ bytes of weights, G·Ψ of gradients and
K·Ψ of optimizer state, and stage s partitions the first s of (optimizer state, gradients,
weights) over N workers. Mixed-precision Adam is P = G = 2, K = 12 (fp32 master copy,
momentum, variance); fp32 training with DeepSpeed on a CPU is P = G = 4 and still K = 12,
because DeepSpeed's ZeRO optimizer keeps an fp32 copy of its partition beside the weights.
"""

from __future__ import annotations

from torch import nn

from trainers.errors import ConfigError


def enable_grad_checkpointing(module: nn.Module, model_name: str) -> int:
    """Turn on activation recomputation in every Hugging Face model inside ``module``."""
    done = 0
    for m in module.modules():
        if not getattr(m, "supports_gradient_checkpointing", False):
            continue
        # non-reentrant: works when the inputs need no grad (frozen embeddings, adapters)
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers 5 renamed it
            if m.is_activation_checkpointing:
                continue  # an outer model already turned it on for this one
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            if m.is_gradient_checkpointing:
                continue
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        done += 1
    if not done:
        raise ConfigError(f"train.grad_checkpointing: model.name={model_name!r} has no Hugging "
                          f"Face module that supports it (text models do)")
    return done


def zero_model_state_bytes(psi: float, stage: int, workers: int, *, param_bytes: float = 2,
                           grad_bytes: float = 2, optim_bytes: float = 12) -> float:
    """Model-state bytes per worker for ZeRO ``stage`` (0-3), from the ZeRO paper."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}: expected 0-3")
    n = max(1, workers)
    p = param_bytes / n if stage >= 3 else param_bytes
    g = grad_bytes / n if stage >= 2 else grad_bytes
    k = optim_bytes / n if stage >= 1 else optim_bytes
    return (p + g + k) * psi
