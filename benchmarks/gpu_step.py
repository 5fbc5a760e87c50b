"""On one CUDA GPU: ``trainers.fit`` step time vs a hand-written bf16 loop (MiniLM, mpnet),
and DeepSpeed ZeRO-3 on one GPU through Ray Train. Run by benchmarks/gpu_check.sh.

    python -m benchmarks.gpu_step --models minilm mpnet --steps 60
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_results

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "sst2-minilm.yaml"
WINDOW = 10


def recipe(model: str, steps: int, out: Path, *extra: str):
    from trainers.recipe import load_config

    return load_config(RECIPE, [
        f"model.name={model}", "data.shots=64", "data.max_test=64", "train.batch_size=32",
        f"train.max_steps={steps}", f"train.epochs={steps}", f"train.eval_every={WINDOW}",
        "train.save_checkpoints=false", "train.progress=false", "train.device=cuda",
        "train.precision=bf16", f"train.output_dir={out}", *extra])


def per_step(clock: list[float]) -> float:
    spans = [b - a for a, b in itertools.pairwise(clock[1:])]  # drop the warm-up window
    return statistics.median(spans) / WINDOW


def plain_bf16(cfg) -> list[float]:
    """What one writes by hand: AdamW, bf16 autocast, clipping, a clock every window."""
    from trainers.batches import epoch_order
    from trainers.data import load_dataset
    from trainers.models import create_model

    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    built = create_model(cfg.model, data.num_classes)
    model, tok = built.module.cuda(), built.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    split, t = data.train, cfg.train
    clock, step, epoch, t0 = [], 0, 0, time.perf_counter()
    model.train()
    while step < t.max_steps:
        order = epoch_order(len(split), t.seed, epoch, 0, 1)
        for i in range(0, len(order), t.batch_size):
            idx = order[i:i + t.batch_size]
            enc = tok([split.inputs[j] for j in idx], padding=True, truncation=True,
                      max_length=cfg.data.max_length, return_tensors="pt").to("cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            loss = F.cross_entropy(logits.float(), split.labels[torch.as_tensor(idx)].cuda())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % WINDOW == 0:
                torch.cuda.synchronize()
                clock.append(time.perf_counter() - t0)
            if step >= t.max_steps:
                break
        epoch += 1
    return clock


def fit_bf16(cfg) -> list[float]:
    from trainers.loop import fit

    return [row["time_s"] for row in fit(cfg).history]


def zero3_one_gpu(cfg) -> float:
    from cluster.train import train_distributed

    cfg = cfg.replace({"train.engine": "deepspeed", "train.zero_stage": 3,
                       "scaling.num_workers": 1, "scaling.use_gpu": True})
    t0 = time.perf_counter()
    train_distributed(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "mpnet"])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: benchmarks/gpu_step.py needs a GPU")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(tempfile.mkdtemp(prefix="gpu-step-"))
    rows, payload = [], {"gpu": torch.cuda.get_device_name(), "models": {}}
    for model in args.models:
        cfg = recipe(model, args.steps, out)
        plain = per_step(plain_bf16(cfg))
        ours = per_step(fit_bf16(cfg))
        z3 = zero3_one_gpu(recipe(model, args.steps, out, "train.eval_every=0"))
        payload["models"][model] = {"plain_step_s": plain, "fit_step_s": ours,
                                    "zero3_wall_s": z3}
        rows.append([model, f"{plain * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{ours / plain:.3f}",
                     f"{z3:.1f}"])
        print(rows[-1], flush=True)
    md = "\n".join([
        (f"GPU: {payload['gpu']}; batch 32 x <=64 tokens, bf16 autocast, AdamW, {args.steps} "
        f"steps, medians of {WINDOW}-step windows after the first."), "",
        markdown_table(["model", "plain loop ms/step", "fit ms/step", "fit / plain",
                        f"ZeRO-3, 1 GPU, Ray Train: wall s for {args.steps} steps"], rows)])
    write_results("gpu_step", payload, md)
    print(md)


if __name__ == "__main__":
    main()
