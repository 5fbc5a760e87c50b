"""Parameter-efficient fine-tuning with the ``peft`` library, applied to a built model from outside.

``model.adapter: lora | ia3`` injects peft's adapter layers into the backbone in place (the
model keeps its type and its head's name, so strategies, engines and exports see the same
module), freezes everything else and leaves the new head trainable. ``model.adapter_params``
are the fields of peft's own config class (``LoraConfig`` / ``IA3Config``), checked against
that class before any model is built. Checkpoints of an adapted model hold only what training
can change: the adapter weights and the head (``trainable_state``); the frozen backbone comes
back from the same pretrained files (or the same seed) when the run resumes.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch
from torch import nn

from trainers.config import ModelConfig, coerce_value
from trainers.errors import CheckpointError, ConfigError, did_you_mean

# peft config fields that smallshot sets itself (or that make no sense for a classifier head)
RESERVED = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
            "modules_to_save", "auto_mapping")
ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
           "targets": "target_modules", "modules": "target_modules"}


def _config_class(name: str) -> type:
    try:
        import peft
    except ImportError:
        raise ConfigError(f"model.adapter={name}: the peft package is not installed "
                          f"(pip install peft)") from None
    classes = {"lora": peft.LoraConfig, "ia3": peft.IA3Config}
    return classes[name]


def _fields(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):  # an annotation peft cannot resolve
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.init and f.name not in RESERVED}


def peft_config(cfg: ModelConfig, targets: tuple[list[str], list[str]] | None = None,
                exclude: list[str] | None = None):
    """peft's config object for ``cfg.adapter`` / ``cfg.adapter_params`` (one-line errors)."""
    cls = _config_class(cfg.adapter)
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in cfg.adapter_params.items():
        where = f"model.adapter_params.{key}"
        if key not in fields:
            extra = (f"; did you mean {ALIASES[key]!r}?" if key in ALIASES
                     else did_you_mean(key, list(fields)))
            raise ConfigError(f"{where}: not a parameter of peft's {cls.__name__} for "
                              f"model.adapter={cfg.adapter} (valid: {', '.join(fields)}){extra}")
        kwargs[key] = coerce_value(value, fields[key], where)
    if targets is not None and "target_modules" not in kwargs:
        kwargs["target_modules"] = targets[0]
        if cfg.adapter == "ia3" and "feedforward_modules" not in kwargs:
            kwargs["feedforward_modules"] = targets[1]
    if exclude and "exclude_modules" in fields and "exclude_modules" not in kwargs:
        kwargs["exclude_modules"] = exclude
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.adapter_params: peft's {cls.__name__} refused them "
                          f"({first[:200]})") from None


def check_adapter(cfg: ModelConfig) -> None:
    """Up-front check of ``model.adapter_params`` (no model is built)."""
    if cfg.adapter == "none":
        if cfg.adapter_params:
            raise ConfigError("model.adapter_params: set model.adapter (lora | ia3) to use them")
        return
    peft_config(cfg, (["query"], []))  # a placeholder target: only the values are checked


# peft's tables name the layers to adapt for each Hugging Face model type; for the types they
# lack, ours (IA3 rescales the input of its feed-forward modules, the output of the others)
EXTRA_LORA = {"mpnet": ["q", "v"]}
EXTRA_IA3 = {"mpnet": (["k", "v", "output.dense"], ["output.dense"])}


def _hf_model_type(module: nn.Module) -> str | None:
    for m in module.modules():
        conf = getattr(m, "config", None)
        if conf is not None and hasattr(conf, "model_type"):
            return conf.model_type
    return None


def default_targets(adapter: str, module: nn.Module) -> tuple[list[str], list[str]] | None:
    """(target modules, IA3 feed-forward modules) for the Hugging Face model in ``module``."""
    from peft.utils import constants as c

    kind = _hf_model_type(module) or ""
    if adapter == "lora":
        targets = c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind, EXTRA_LORA.get(kind))
        return (list(targets), []) if targets else None
    if kind in c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
        return (list(c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]),
                list(c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(kind, [])))
    return EXTRA_IA3.get(kind)


def apply_adapter(cfg: ModelConfig, built: Any) -> Any:
    """Inject the configured adapter into ``built.module`` (in place); the head stays trainable."""
    if cfg.adapter == "none":
        return built
    from peft import inject_adapter_in_model

    targets = default_targets(cfg.adapter, built.module)
    if targets is None and "target_modules" not in cfg.adapter_params:
        raise ConfigError(f"model.adapter={cfg.adapter}: no default target modules for "
                          f"model.name={cfg.name!r}; set model.adapter_params.target_modules "
                          f"(e.g. {linear_names(built.module)[:4]})")
    heads = [p.rstrip(".") for p in built.head_prefixes]
    config = peft_config(cfg, targets, exclude=heads)
    try:
        inject_adapter_in_model(config, built.module)
    except ValueError as e:  # e.g. target modules not found
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"model.adapter_params.target_modules: {first[:160]} (linear layers "
                          f"here: {', '.join(linear_names(built.module)[:8])})") from None
    for name, p in built.module.named_parameters():  # peft froze everything but the adapter
        if name.startswith(built.head_prefixes):
            p.requires_grad_(True)
    return built


def linear_names(module: nn.Module) -> list[str]:
    """Distinct last-component names of the linear layers (what target_modules matches)."""
    seen: list[str] = []
    for name, m in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, (nn.Linear,)) and leaf not in seen:
            seen.append(leaf)
    return seen


def has_adapter(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft nothing can carry an adapter
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def checkpoint_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``state``: all of it, or the adapter + head of adapted models."""
    if not has_adapter(module):
        return state
    keep = trainable_names(module)
    return {k: v for k, v in state.items() if k in keep}


def load_checkpoint_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint written by ``checkpoint_state`` (strict about what it must hold)."""
    if not has_adapter(module):
        module.load_state_dict(state)
        return
    want = trainable_names(module)
    missing = sorted(want - set(state))
    extra = sorted(set(state) - set(module.state_dict()))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: adapter checkpoint does not fit model.adapter and "
                              f"model.adapter_params ({what})")
    module.load_state_dict(state, strict=False)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total
