"""Helpers shared by the benchmark scripts: seeded repeats, mean ± std, JSON + markdown out."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_results(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """benchmarks/results/<name>.json and .md, written whole (tmp + rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return RESULTS / f"{name}.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_seeds(recipe: str, overrides: list[str], seeds: int, out_dir: str,
              metric: str = "test/accuracy", progress: Callable[[str], None] = print
              ) -> list[float]:
    """Train ``recipe`` once per few-shot seed (data.seed = 0..seeds-1); the metric per seed."""
    from trainers.config import load_config
    from trainers.loop import fit

    values = []
    for seed in range(seeds):
        cfg = load_config(recipe, [*overrides, f"data.seed={seed}", f"train.output_dir={out_dir}",
                                   "train.progress=false", "train.save_checkpoints=false"])
        values.append(float(fit(cfg).metrics[metric]))
        progress(f"  {' '.join(overrides) or '(recipe)'} seed {seed}: {values[-1]:.4f}")
    return values
