"""Helpers shared by the benchmark scripts: seeded repeats, mean ± std, JSON + markdown out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from trainers import io
from trainers.metrics import mean_std  # noqa: F401  (the benchmarks' one mean ± sample std)

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_results(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """benchmarks/results/<name>.json and .md, written whole (tmp + rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    io.write_json(RESULTS / f"{name}.json", payload)
    return io.write_text(RESULTS / f"{name}.md", markdown)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_seeds(recipe: str, overrides: list[str], seeds: int, out_dir: str,
              metric: str = "test/accuracy", progress: Callable[[str], None] = print
              ) -> list[float]:
    """Train ``recipe`` once per few-shot seed (data.seed = 0..seeds-1); the metric per seed."""
    from cluster.run import evaluate_seeds
    from trainers.recipe import load_config

    cfg = load_config(recipe, [*overrides, f"train.output_dir={out_dir}",
                               "train.progress=false", "train.save_checkpoints=false"])
    results = evaluate_seeds(cfg, seeds, on_seed=lambda row: progress(
        f"  {' '.join(overrides) or '(recipe)'} seed {row['seed']}: {row[metric]:.4f}"))
    return [float(row[metric]) for row in results.per_seed]
