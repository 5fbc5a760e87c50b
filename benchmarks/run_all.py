"""Run every benchmark, one subprocess each (a failure is reported and the rest still run).

    python -m benchmarks.run_all [--quick] [--only fewshot_text omniglot_oneshot]

Each entry gives the arguments of a full run and of a quick one (minutes in all on 2 cores).
fewshot_text caches its cells, so a full run interrupted (or cut by --budget-min) resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# module -> (full-run arguments, quick-run arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "augment_throughput": ([], ["--repeats", "1", "--limit", "256"]),
    "augment_accuracy": ([], ["--quick"]),
    "train_overhead": ([], ["--repeats", "1", "--models", "mlp"]),
    "fewshot_text": ([], ["--quick"]),
    "precision_speed": ([], ["--reps", "1"]),
    "omniglot_oneshot": ([], ["--quick"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick variant of every benchmark")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = ap.parse_args(argv)
    failed = []
    for name in args.only:
        full, quick = BENCHMARKS[name]
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(quick if args.quick else full)]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
