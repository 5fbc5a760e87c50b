"""smallshot trainers: config, data, models, optimizers, metrics, engines and the one loop."""

from typing import Any

__all__ = ["fit", "load_config", "RunConfig", "RunResult", "Hooks"]


def __getattr__(name: str) -> Any:  # keep `import trainers` light: torch loads on first use
    if name in ("fit", "RunResult", "Hooks"):
        from trainers import loop

        return getattr(loop, name)
    if name == "load_config":
        from trainers import recipe

        return recipe.load_config
    if name == "RunConfig":
        from trainers import config

        return config.RunConfig
    raise AttributeError(name)
