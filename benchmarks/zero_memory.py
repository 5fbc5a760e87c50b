"""Per-worker memory and step time of DeepSpeed ZeRO 0-3 (+ CPU offload) and LoRA vs full
fine-tuning, on a random-init decoder built from a config, 2 CPU workers on local Ray; beside
the ZeRO paper's model-state formula.

    flock /tmp/smallshot-heavy.lock python -m benchmarks.zero_memory            # ~355 M params
    python -m benchmarks.zero_memory --quick                                    # ~30 M, minutes

Every run is ``trainers.fit`` on Ray Train (the same loop users run). Inside each worker a
hook notes, after each optimizer step, the time and the resident memory; after the last step
it also adds up the bytes of every live tensor (weights, gradients, optimizer state,
DeepSpeed's flat buffers and fp32 partitions, shared storage counted once). Reported per
worker: the resident memory before the model exists (imports, Ray), the peak (VmHWM), the
resident memory after the last step minus the baseline ("model-state RSS": activations are
freed by then), the live-tensor bytes, and the optimizer state bytes alone.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table, write_results
from trainers.memory import zero_model_state_bytes

# GPT-2 medium's shape (355 M parameters); --quick: a 6-layer, 512-wide model
BIG = {"n_embd": 1024, "n_layer": 24, "n_head": 16}
QUICK = {"n_embd": 512, "n_layer": 6, "n_head": 8}

RUNS = {  # name -> overrides, in the order they run (the goals' rows first)
    "ZeRO-3": ["train.engine=deepspeed", "train.zero_stage=3"],
    "ZeRO-0": ["train.engine=deepspeed", "train.zero_stage=0"],
    "LoRA r=8, ZeRO-0": ["train.engine=deepspeed", "train.zero_stage=0", "model.adapter=lora",
                         "model.adapter_params={r: 8}"],
    "ZeRO-1": ["train.engine=deepspeed", "train.zero_stage=1"],
    "ZeRO-2": ["train.engine=deepspeed", "train.zero_stage=2"],
    "ZeRO-3 + offload": ["train.engine=deepspeed", "train.zero_stage=3", "train.offload=true",
                         "train.offload_params=true"],
}


def write_model_folder(folder: Path, shape: dict[str, int]) -> Path:
    """A GPT-2-style config (no weights) plus a small byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    conf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
            "n_positions": 1024, "bos_token_id": 0, "eos_token_id": 0, **shape}
    (folder / "config.json").write_text(json.dumps(conf))
    tok = ByteLevelBPETokenizer()
    corpus = ["a good film with a great plot", "a dull movie, boring and far too long"] * 50
    tok.train_from_iterator(corpus, vocab_size=400, special_tokens=["<|endoftext|>"])
    tok.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def write_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["text\tlabel"] + [f"a good film number {i}\t1" for i in range(16)] + \
        [f"a dull movie number {i}\t0" for i in range(16)]
    for split in ("train", "test"):
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def live_tensor_bytes() -> tuple[int, int, int]:
    """(bytes of all live tensor storages, of optimizer state, of DeepSpeed's communication
    buckets), each storage once. The buckets are what the ZeRO paper calls constant-size
    buffers (section 6): not model state, so the formula leaves them out."""
    import torch

    seen: dict[int, int] = {}
    optim_seen: dict[int, int] = {}
    buffer_seen: dict[int, int] = {}

    def add(t: Any, into: dict[int, int]) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            s = t.untyped_storage()
            if s.nbytes():
                into[s.data_ptr()] = s.nbytes()

    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            add(obj, seen)
            if obj.grad is not None:
                add(obj.grad, seen)
            ds = getattr(obj, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
            if ds is not None:
                add(ds, seen)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v, optim_seen)
        if type(obj).__name__.startswith("DeepSpeedZeroOptimizer"):  # stage 3 keeps its bucket
            for bucket in (getattr(obj, "ipg_buckets", None) or {}).values():
                add(getattr(bucket, "buffer", None), buffer_seen)
    for ptr, n in (*optim_seen.items(), *buffer_seen.items()):
        seen.setdefault(ptr, n)
    return sum(seen.values()), sum(optim_seen.values()), sum(buffer_seen.values())


def bench_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: ``fit`` with a hook that notes time and memory after every step."""
    import ray.train
    import torch

    from trainers.config import from_dict
    from trainers.loop import Hooks, fit

    cfg = from_dict(config["cfg"], source="benchmark")
    torch.set_num_threads(1)
    gc.collect()
    baseline = _status_kib("VmRSS")
    marks: list[tuple[float, int]] = []
    record: dict[str, Any] = {}

    def after_step(row: dict[str, Any], _folder: Any) -> None:
        marks.append((time.perf_counter(), _status_kib("VmRSS")))

    def at_finish(row: dict[str, Any], _folder: Any) -> None:
        # the last step's evaluation comes here, not to on_evaluation; the model still lives
        gc.collect()
        record["rss_after_kib"] = _status_kib("VmRSS")
        (record["tensor_bytes"], record["optimizer_bytes"],
         record["buffer_bytes"]) = live_tensor_bytes()

    result = fit(cfg, Hooks(on_evaluation=after_step, on_finish=at_finish,
                            local_rank=ray.train.get_context().get_local_rank()))
    times = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    from trainers.adapters import count_parameters  # noqa: F401  (params counted by the driver)

    record.update(baseline_kib=baseline, peak_kib=_status_kib("VmHWM"),
                  step_s=statistics.median(times) if times else None,
                  loss=[r["train/loss"] for r in result.history],
                  rank=ray.train.get_context().get_world_rank())
    out = Path(config["out"]) / f"rank-{record['rank']}.json"
    out.write_text(json.dumps(record))


def run_one(name: str, overrides: list[str], folder: Path, data: Path, out: Path,
            steps: int) -> list[dict[str, Any]]:
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.train import resolve_paths, scaling_config
    from trainers.recipe import load_config

    cfg = resolve_paths(load_config(None, [
        "name=zero-memory", "data.format=text", f"data.root={data}", "data.shots=16",
        "data.max_length=32", f"model.name=hf:{folder}", "model.pretrained=false",
        "optim.name=adamw", "optim.lr=1e-4", "optim.warmup=0", "optim.grad_clip=null",
        "train.batch_size=2", f"train.max_steps={steps}", "train.eval_every=1",
        "train.save_checkpoints=false", "train.test=false", "train.progress=false",
        f"train.output_dir={out}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        *overrides]))
    ranks = out / "ranks" / name.replace(" ", "_").replace("/", "_")
    ranks.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        bench_worker, train_loop_config={"cfg": cfg.to_dict(), "out": str(ranks)},
        scaling_config=scaling_config(cfg), torch_config=TorchConfig(backend="gloo"),
        run_config=RayRunConfig(name=f"zero-memory-{len(list(out.glob('*')))}",
                                storage_path=str(out / "ray")))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return [json.loads(p.read_text()) for p in sorted(ranks.glob("rank-*.json"))]


def count_params(folder: Path, lora: bool) -> tuple[int, int]:
    from trainers.adapters import count_parameters
    from trainers.models import create_model
    from trainers.recipe import load_config

    extra = ["model.adapter=lora", "model.adapter_params={r: 8}"] if lora else []
    cfg = load_config(None, ["data.format=text", "data.root=.", f"model.name=hf:{folder}",
                             "model.pretrained=false", *extra], check_paths=False)
    built = create_model(cfg.model, 2)
    counts = count_parameters(built.module)
    del built
    gc.collect()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 M model instead of ~355 M")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only these (names as in the table)")
    ap.add_argument("--report", action="store_true", help="rewrite the markdown from the last "
                    "results file")
    ap.add_argument("--keep", action="store_true", help="with --only: keep the other runs' "
                    "finished rows from the last results file (same model and steps)")
    args = ap.parse_args()
    if args.report:  # the markdown again from the last results file, nothing run
        last = json.loads((RESULTS / f"{results_name(args)}.json").read_text())
        args.steps = last["steps"]
        rows = {k: v["ranks"] if isinstance(v, dict) else v for k, v in last["runs"].items()}
        report(rows, last["params"], last["params"], last["trainable_lora"], args)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="zero-memory-"))
    folder = write_model_folder(tmp / "model", QUICK if args.quick else BIG)
    data = write_data(tmp / "data")
    trainable_full, psi = count_params(folder, lora=False)
    trainable_lora, _ = count_params(folder, lora=True)
    print(f"model: {psi / 1e6:.1f} M parameters (LoRA r=8 trains {trainable_lora / 1e6:.2f} M)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    rows = kept_rows(args, psi) if args.keep else {}
    for name, overrides in RUNS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            rows[name] = run_one(name, overrides, folder, data, tmp / "runs", args.steps)
        except Exception as e:  # noqa: BLE001 (one failing configuration must not hide the others)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"{name}: FAILED ({first})")
            rows[name] = [{"error": first}]
            continue
        r0 = rows[name][0]
        print(f"{name}: {time.perf_counter() - t0:.0f} s; rank 0 peak "
              f"{r0['peak_kib'] / 2**20:.2f} GiB, step {r0['step_s']:.2f} s", flush=True)
        report(rows, psi, trainable_full, trainable_lora, args)  # so far: a cut run keeps them
    ray.shutdown()


def results_name(args: argparse.Namespace) -> str:
    return "zero_memory_quick" if args.quick else "zero_memory"


def kept_rows(args: argparse.Namespace, psi: int) -> dict[str, list[dict[str, Any]]]:
    """Finished runs of the last results file for the same model and steps, not rerun now."""
    path = RESULTS / f"{results_name(args)}.json"
    if not path.is_file():
        return {}
    last = json.loads(path.read_text())
    if (last.get("params"), last.get("steps")) != (psi, args.steps):
        return {}
    return {name: run["ranks"] for name, run in last["runs"].items()
            if isinstance(run, dict) and not (args.only and name in args.only)}


def report(rows: dict[str, list[dict[str, Any]]], psi: int, trainable_full: int,
           trainable_lora: int, args: argparse.Namespace) -> None:
    gib = 2 ** 30
    n = 2
    table = []
    payload_rows = {}
    zero0 = rows.get("ZeRO-0", [{}])
    full_optim = (statistics.mean(x["optimizer_bytes"] for x in zero0)
                  if "optimizer_bytes" in zero0[0] else None)
    for name, ranks in sorted(rows.items(), key=lambda kv: list(RUNS).index(kv[0])):
        if "error" in ranks[0]:
            table.append([name, "failed: " + ranks[0]["error"][:80], *[""] * 8])
            payload_rows[name] = ranks
            continue
        stage = 0 if "ZeRO-0" in name else int(name.split("ZeRO-")[1][0])
        lora = name.startswith("LoRA")
        # fp32 on a CPU: 4-byte weights and gradients; DeepSpeed's ZeRO optimizer (stages 1-3)
        # keeps an fp32 copy of its partition besides Adam's two moments (K = 12); ZeRO-0 steps
        # torch's Adam on the weights themselves (K = 8)
        k = 8 if stage == 0 else 12
        trained = trainable_lora if lora else psi
        formula = (zero_model_state_bytes(trained, stage, n, param_bytes=4, grad_bytes=4,
                                          optim_bytes=k)
                   + (4 * (psi - trained) if lora else 0))  # frozen weights: stored, no state
        paper = zero_model_state_bytes(psi, stage, n)  # mixed precision, for orientation
        r = max(ranks, key=lambda x: x["peak_kib"])
        state_rss = (r["rss_after_kib"] - r["baseline_kib"]) * 1024
        optim = statistics.mean(x["optimizer_bytes"] for x in ranks)
        step = statistics.mean(x["step_s"] for x in ranks)
        buffers = r.get("buffer_bytes", 0)
        states = r["tensor_bytes"] - buffers
        # after the step the gradients are released (zero_grad sets them to None) unless
        # ZeRO-3 keeps its partition in a flat buffer: the formula without G, for comparison
        no_grads = (formula if stage == 3 else zero_model_state_bytes(
            trained, stage, n, param_bytes=4, grad_bytes=0, optim_bytes=k)
            + (4 * (psi - trained) if lora else 0))
        payload_rows[name] = {"ranks": ranks, "formula_bytes": formula, "paper_bytes": paper,
                              "formula_without_grads_bytes": no_grads,
                              "ratio_tensors_to_formula_without_grads":
                                  r["tensor_bytes"] / no_grads,
                              "model_state_rss_bytes": state_rss,
                              "ratio_rss_to_formula": state_rss / formula,
                              "ratio_tensors_to_formula": r["tensor_bytes"] / formula,
                              "buffer_bytes": buffers,
                              "ratio_states_to_formula": states / formula,
                              "step_s": step, "optimizer_bytes": optim}
        table.append([name, f"{formula / gib:.2f}", (f"{state_rss / gib:.2f} "
                      f"({state_rss / formula:.2f}x)"), (f"{r['tensor_bytes'] / gib:.2f} "
                      f"({r['tensor_bytes'] / formula:.2f}x)"), f"{buffers / gib:.3f}",
                      f"{states / gib:.2f} ({states / formula:.2f}x)",
                      f"{r['peak_kib'] / 2**20:.2f}", f"{optim / gib:.3f}", f"{step:.2f}",
                      f"{paper / gib:.2f}"])
    lines = [
        "# ZeRO memory per worker: measured vs the ZeRO paper's formula", "",
        (f"`python -m benchmarks.zero_memory{' --quick' if args.quick else ''}` — a random-init "
        f"GPT-2-style decoder of **{psi / 1e6:.1f} M parameters** (from a config, no weights) as a "
        f"2-class sequence classifier, 2 Ray Train workers on one 2-core CPU machine (gloo, "
        f"fp32, 1 thread per worker), AdamW, batch 2 x 32 tokens per worker, {args.steps} steps "
        f"each. The machine was shared with other jobs: step times are noisy. Memory per worker "
        f"(the larger of the two ranks); GiB = 2^30 bytes."), "",
        ("- *formula*: model-state bytes per worker, (P + G + K) Ψ with stage s partitioning the "
        "first s of (optimizer state, gradients, weights) over N = 2 workers (ZeRO paper, "
        "section 3); here P = G = 4 (fp32) and K = 12 for stages 1-3 (DeepSpeed's fp32 "
        "partition copy + Adam's moments), K = 8 for ZeRO-0 (Adam on the weights). LoRA: "
        "the formula for the trained Ψ plus 4 bytes per frozen weight."),
        ("- *model-state RSS*: resident memory after the last step (activations freed) minus "
        "the resident memory before the model existed; *live tensors*: bytes of every live "
        "tensor storage then; *buckets*: DeepSpeed's communication buckets among them (ZeRO-3 "
        "allocates its gradient bucket up front; the paper counts such constant-size buffers "
        "apart from model states, section 6), sized by train's rule: a tenth of the trained "
        "parameters, 1 M to 50 M elements; *model states*: live tensors less the buckets; "
        "*peak*: the process's VmHWM, including the moment the whole model is built in fp32 "
        "before DeepSpeed partitions it."),
        ("- *paper, mixed precision*: the same formula with P = G = 2, K = 12 (what a GPU run "
        "in fp16/bf16 would hold), for orientation."), "",
        markdown_table(["run", "formula GiB", "model-state RSS GiB (x formula)",
                        "live tensors GiB (x formula)", "buckets GiB",
                        "model states GiB (x formula)", "peak RSS GiB", "optimizer state GiB",
                        "step s", "paper, mixed precision GiB"], table),
    ]
    z3 = payload_rows.get("ZeRO-3")
    lora = payload_rows.get("LoRA r=8, ZeRO-0")
    goals = {}
    if isinstance(z3, dict):
        goals["zero3_rss_within_1.25x"] = z3["ratio_rss_to_formula"] <= 1.25
        goals["zero3_model_states_within_1.25x"] = z3["ratio_states_to_formula"] <= 1.25
        met = goals["zero3_model_states_within_1.25x"]
        lines.append(f"Goal ZeRO-3 model-state memory within 1.25x of the formula: "
                     f"{'met' if met else 'not met'} by the model states; "
                     f"RSS {z3['ratio_rss_to_formula']:.2f}x "
                     f"({'within' if goals['zero3_rss_within_1.25x'] else 'beyond'} 1.25x: "
                     f"resident memory also holds what the allocator keeps), live tensors "
                     f"{z3['ratio_tensors_to_formula']:.2f}x, model states (live tensors less "
                     f"the buckets) {z3['ratio_states_to_formula']:.2f}x.")
    if isinstance(lora, dict) and full_optim:
        frac = lora["optimizer_bytes"] / full_optim
        goals["lora_optimizer_state_le_2pct"] = frac <= 0.02
        lines.append(f"\nGoal LoRA optimizer state <= 2 % of full fine-tuning's (both ZeRO-0): "
                     f"{frac * 100:.2f} % ({lora['optimizer_bytes'] / 2**20:.1f} MiB vs "
                     f"{full_optim / 2**20:.0f} MiB; trainable {trainable_lora / 1e6:.2f} M of "
                     f"{psi / 1e6:.1f} M) — {'met' if frac <= 0.02 else 'not met'}.")
    below = {k: v["ratio_tensors_to_formula_without_grads"] for k, v in payload_rows.items()
             if isinstance(v, dict) and "ZeRO-3" not in k}
    if below:
        lines.append("\nZeRO 0-2 below the formula: the live tensors are counted after the step, "
                     "when the gradients have been released (zero_grad sets them to None), so "
                     "the formula's G term is absent then (ZeRO-3 keeps its gradient partition "
                     "in a flat buffer, counted). Against the formula without G, live tensors: "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in below.items()) + ".")
    missing = [n for n in RUNS if n not in rows and not (args.only and n not in args.only)]
    if missing:
        lines.append(f"\nNot (yet) run: {', '.join(missing)}.")
    md = "\n".join(lines) + "\n"
    write_results(results_name(args), {"params": psi, "trainable_lora": trainable_lora, "workers": n,
                         "steps": args.steps, "runs": payload_rows, "goals": goals}, md)
    print(md)


if __name__ == "__main__":
    main()
