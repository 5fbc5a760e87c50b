"""Helpers shared by the benchmark scripts: seeded repeats, mean ± std, JSON + markdown out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers import io
from trainers.metrics import mean_std  # noqa: F401  (the benchmarks' one mean ± sample std)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SST2 = ROOT.parent / "shared" / "data" / "text" / "sst2"


def timed_launch(args: list[str], env: dict[str, str], timeout: float = 3600
                 ) -> tuple[subprocess.CompletedProcess, float]:
    """``launch.py <args>`` in a new process from the repo root: its output and wall seconds;
    a failure raises with the command and the tail of its output."""
    cmd = [sys.executable, "launch.py", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc, wall


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_description() -> str:
    """This machine's CPU as a results note names it: the model, the cores, and whether it
    multiplies bf16 in hardware: where it does not, train.precision=bf16-native runs fp32 and
    every time in a report moves (fewshot_gen4_timing.md against fewshot_gen4_timing_epyc.md)."""
    from trainers.engines import native_bf16_cpu  # torch: only when a result is written

    bf16 = "bf16 in hardware" if native_bf16_cpu() else "no bf16 arithmetic (bf16-native: fp32)"
    return f"{cpu_name()}, {os.cpu_count()} cores, {bf16}"


def need_sst2() -> Path:
    """The shared SST-2 folder, or exit with one line saying where it should be."""
    if not SST2.is_dir():
        sys.exit(f"error: {SST2} is absent (shared data lives in ../shared beside the repo)")
    return SST2


def in_turn(names: list[str], reps: int, run_one: Callable[[str, int], dict[str, Any]]
            ) -> dict[str, list[dict[str, Any]]]:
    """Each case once per rep, the cases taking turns (so slow drifts of a shared machine hit
    them alike); prints each result as it comes."""
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names:
            out[name].append(run_one(name, rep))
            print(name, out[name][-1], flush=True)
    return out


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
