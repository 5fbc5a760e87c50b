"""LoRA vs full fine-tuning on a few-shot text task: accuracy, trainable parameters, step time
and checkpoint size, the same few-shot draws for both.

    flock /tmp/smallshot-heavy.lock python -m benchmarks.lora_vs_full --model minilm --seeds 3

Both start from ``configs/sst2-minilm.yaml`` (K=8 per class here, 300 fixed test sentences);
LoRA is peft's usual recipe for BERT-style encoders (r=8, alpha=16 on query/value, the head
trained in full) at the LR peft's examples use for it (1e-3), not one tuned on this test set.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import fmt, markdown_table, write_results

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "sst2-minilm.yaml"
METHODS = {
    "full fine-tuning": ["optim.lr=1e-4"],
    "LoRA r=8": ["model.adapter=lora", "model.adapter_params={r: 8, lora_alpha: 16}",
                 "optim.lr=1e-3"],
}


def one_run(model: str, method: str, seed: int, out: Path, shots: int, max_test: int,
            threads: int) -> dict:
    from trainers.adapters import count_parameters
    from trainers.checkpoints import load_checkpoint_model
    from trainers.loop import fit
    from trainers.recipe import load_config

    cfg = load_config(RECIPE, [
        f"model.name={model}", f"data.shots={shots}", f"data.max_test={max_test}",
        f"data.seed={seed}", f"train.output_dir={out}", "train.progress=false",
        f"train.num_threads={threads}", *METHODS[method]])
    result = fit(cfg)
    # the loop's own "train" lap: the gaps between history rows would also count the
    # per-epoch evaluation and checkpoint writes (86 MiB a time for full MiniLM)
    step_s = result.timings.get("train", float("nan")) / max(result.steps, 1)
    final = result.run_dir / "checkpoints" / "final"
    built = load_checkpoint_model(cfg, final, 2)
    trainable, total = count_parameters(built.module)
    return {"seed": seed, "accuracy": result.metrics["test/accuracy"],
            "f1": result.metrics["test/f1"], "step_s": step_s, "trainable": trainable,
            "total": total, "checkpoint_bytes": (final / "model.pt").stat().st_size,
            "steps": result.steps, "checkpoint_s": result.timings.get("checkpoints"),
            "wall_s": sum(result.timings.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="minilm | mpnet")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--max-test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):  # both methods on a draw before the next draw
        for method in METHODS:
            t0 = time.perf_counter()
            row = one_run(args.model, method, seed, out / method.split()[0], args.shots,
                          args.max_test, args.threads)
            runs[method].append(row)
            print(f"{args.model} {method} seed {seed}: acc {row['accuracy']:.4f}, step "
                  f"{row['step_s']:.3f} s, {time.perf_counter() - t0:.0f} s", flush=True)
    table = []
    for method, rows in runs.items():
        r0 = rows[0]
        table.append([method, fmt([r["accuracy"] for r in rows]),
                      (f"{r0['trainable'] / 1e6:.3f} M of {r0['total'] / 1e6:.1f} M "
                      f"({100 * r0['trainable'] / r0['total']:.2f} %)"),
                      f"{statistics.median(r['step_s'] for r in rows):.3f}",
                      f"{r0['checkpoint_bytes'] / 2**20:.2f}",
                      f"{statistics.median(r['checkpoint_s'] for r in rows):.1f}",
                      f"{statistics.median(r['wall_s'] for r in rows):.0f}"])
    full, lora = runs["full fine-tuning"], runs["LoRA r=8"]
    ratio_ckpt = lora[0]["checkpoint_bytes"] / full[0]["checkpoint_bytes"]
    ratio_step = (statistics.median(r["step_s"] for r in lora)
                  / statistics.median(r["step_s"] for r in full))
    md = "\n".join([
        f"# LoRA vs full fine-tuning ({args.model})", "",
        (f"`python -m benchmarks.lora_vs_full --model {args.model} --seeds {args.seeds}`: "
        f"SST-2, K={args.shots} per class, {args.max_test} fixed test sentences, the "
        f"`configs/sst2-minilm.yaml` recipe (15 epochs, batch 8, AdamW, linear schedule), the "
        f"same {args.seeds} few-shot draws for both; accuracy % as mean ± sample std over the "
        f"draws. Step time is the training loop's own time per optimizer step (forward, backward, "
        f"update; not the per-epoch evaluation or checkpoint writes, which get their own "
        f"column) on {args.threads} threads, median over runs; run s is the whole run "
        f"(model load, training, checkpoints, test); "
        f"the machine was shared with other jobs. Checkpoint: `checkpoints/final/model.pt` "
        f"(LoRA: adapter + head only; the backbone comes back from the pretrained files)."), "",
        markdown_table(["method", "test accuracy %", "trainable parameters", "step s",
                        "checkpoint MiB", "checkpoint writes s", "run s"], table),
        (f"LoRA's checkpoint is {ratio_ckpt * 100:.2f} % of the full one; its step takes "
        f"{ratio_step:.2f}x the full step's time."), ""])
    write_results(f"lora_vs_full_{args.model}", {"model": args.model, "shots": args.shots,
                                                 "max_test": args.max_test, "runs": runs}, md)
    print(md)


if __name__ == "__main__":
    main()
