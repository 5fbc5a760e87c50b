"""bf16 autocast against float32 on this CPU, for the few-shot recipe's two costs: a CV fold's
training (the pair stage and the probe, 1 thread, as a side-by-side fold runs) and inference
on a test split (2 threads, as the final run's test evaluation).

Both precisions run the same work in turn, ``--reps`` times each, so that load from other
processes falls on both alike; the embeddings of the test split are compared too (cosine
similarity of the two precisions' vectors, the pretrained body).

    python -m benchmarks.precision_speed            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, cpu_name, in_turn, markdown_table, need_sst2, write_results

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "fewshot-minilm.yaml"
PRECISIONS = ("fp32", "bf16")  # train.precision values, timed in turn


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="fewshot_bf16")
    args = ap.parse_args(argv)

    from trainers.batches import Batcher
    from trainers.data import load_dataset
    from trainers.engines import native_bf16_cpu
    from trainers.loop import fit
    from trainers.models import create_model
    from trainers.recipe import load_config
    from trainers.strategies import head_inputs

    root = need_sst2()
    work = Path(tempfile.mkdtemp(prefix="precision_speed_"))
    base = [f"data.root={root}", "data.shots=8", "data.seed=0", "data.max_test=null",
            f"train.output_dir={work}"]
    def fold_seconds(p: str, rep: int) -> float:
        cfg = load_config(RECIPE, [*base, "data.folds=2", "data.fold=0", "train.test=false",
                                   "train.num_threads=1", f"train.precision={p}",
                                   f"train.run_name=fold-{p}-{rep}"])
        t0 = time.perf_counter()
        fit(cfg)
        return time.perf_counter() - t0

    cfg = load_config(RECIPE, [*base, "train.precision=fp32"])
    torch.set_num_threads(2)
    data = load_dataset(cfg.data)
    built = create_model(cfg.model, data.num_classes)
    batchers = {p: Batcher(cfg.replace({"train.precision": p}), built, torch.device("cpu"))
                for p in PRECISIONS}

    def inference(p: str) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        feats = head_inputs(built, batchers[p], data.test, cfg.train.eval_batch_size)
        return time.perf_counter() - t0, feats

    fold_seconds("fp32", -1)  # warm-up: lazy imports, the model cache, first-call allocations
    feats: dict[str, torch.Tensor] = {}

    def run_one(p: str, rep: int) -> dict[str, float]:
        fold = fold_seconds(p, rep)
        torch.set_num_threads(2)  # fit set the fold's 1 thread
        seconds, feats[p] = inference(p)
        return {"fold": fold, "inference": seconds}

    runs = in_turn(list(PRECISIONS), args.reps, run_one)
    secs = {k: {p: [r[k] for r in runs[p]] for p in PRECISIONS} for k in ("fold", "inference")}
    shutil.rmtree(work, ignore_errors=True)
    cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"].float(), dim=-1)

    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in secs.items()}
    ratio = {k: med[k]["fp32"] / med[k]["bf16"] for k in med}
    payload = {"cpu": cpu_name(), "native_bf16": native_bf16_cpu(), "reps": args.reps,
               "seconds": secs, "median_s": med, "speedup_bf16": ratio,
               "test_examples": len(data.test.inputs),
               "embedding_cosine": {"min": float(cos.min()), "mean": float(cos.mean())}}
    rows = [["one CV fold: pair stage + probe + validation (sst2, 8 shots, 1 thread)",
             f"{med['fold']['fp32']:.2f}", f"{med['fold']['bf16']:.2f}",
             f"{ratio['fold']:.2f}x"],
            [f"test inference: {len(data.test.inputs)} sst2 sentences (2 threads)",
             f"{med['inference']['fp32']:.2f}", f"{med['inference']['bf16']:.2f}",
             f"{ratio['inference']:.2f}x"]]
    md = (f"# bf16 autocast against float32 on this CPU\n\n"
          f"{payload['cpu']}; bf16 arithmetic in hardware (AMX or AVX512-BF16): "
          f"{'yes' if payload['native_bf16'] else 'no'}. all-MiniLM-L6-v2, configs/"
          f"fewshot-minilm.yaml; median of {args.reps} runs each, the precisions in turn "
          f"(a shared machine: other work falls on both alike).\n\n"
          + markdown_table(["work", "fp32 s", "bf16 s", "bf16 speed-up"], rows)
          + f"\nThe pretrained body's embeddings of the {len(data.test.inputs)} test sentences"
          f" in the two precisions: cosine similarity min {cos.min():.5f}, mean "
          f"{cos.mean():.6f}. Accuracy over 35 draws is in fewshot_gen4_n8.md (the recipe in "
          f"bf16 against float32 on the same draws).\n")
    path = write_results(args.name, payload, md)
    print(md)
    print(f"written {path} ({RESULTS})")


if __name__ == "__main__":
    main()
