"""smallshot trainers: config, data, models, optimizers, metrics, engines and the one loop."""

from typing import Any

__all__ = ["fit", "load_config", "RunConfig", "RunResult", "Hooks"]


def __getattr__(name: str) -> Any:  # keep `import trainers` light: torch loads on first use
    if name in ("fit", "RunResult", "Hooks"):
        from trainers import loop

        return getattr(loop, name)
    if name in ("load_config", "RunConfig"):
        from trainers import config

        return getattr(config, name)
    raise AttributeError(name)
