"""Augmentation throughput: the batched tensor ``classic`` policy vs the same policy per image.

Both sides start from decoded images in memory (JPEG decoding is the same for both and left
out) and end with a float batch [B, 3, H, W] in [0, 1]:
  * per-sample: torchvision v2 on PIL images, one image at a time, then ToImage + ToDtype and
    a stack, as a DataLoader's per-item transform and collate would;
  * batched: uint8 tensor -> float, then one affine_grid + grid_sample per batch.

    python -m benchmarks.augment_throughput            # ~10 s on 2 cores
    python -m benchmarks.augment_throughput --threads 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from augment import create_augment

DATA = Path("../shared/data/images/cifar10/train")
RESULTS = Path(__file__).resolve().parent / "results"
# the Keras-style example: rotation 20 degrees, shifts of 0.2, horizontal flip
PARAMS = {"rotation": 20, "shift": 0.2, "flip": True}


def load_images(root: Path, limit: int | None) -> list[Image.Image]:
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images under {root} (expected <class>/*.jpg)")
    images = []
    for p in files[:limit]:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def time_interleaved(cases: dict[str, Callable[[], None]],
                     repeats: int) -> dict[str, list[float]]:
    """Seconds per pass for each case, the cases taking turns so that load from other
    processes on a shared machine falls on all of them alike."""
    for fn in cases.values():
        fn()  # warm-up: first-call allocations and lazy imports
    secs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t0)
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder of <class>/*.jpg")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    pil = load_images(args.data, args.limit)
    n = len(pil)
    uint8 = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2)
    size = (uint8.shape[2], uint8.shape[3])
    policy = create_augment("classic", modality="image", strength=1.0, **PARAMS)
    per_item = v2.Compose([policy.to_torchvision(size), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True)])
    bs = args.batch_size
    sink: list[torch.Tensor] = []  # keep one result alive so no work is optimised away

    def per_sample() -> None:
        for i in range(0, n, bs):
            sink[:] = [torch.stack([per_item(im) for im in pil[i:i + bs]])]

    def batched(device: str) -> Callable[[], None]:
        data = uint8.to(device)
        g = torch.Generator(device=device).manual_seed(0)

        def run() -> None:
            for i in range(0, n, bs):
                sink[:] = [policy(data[i:i + bs].float().div_(255), g)]
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases = {"per-sample PIL (torchvision v2)": per_sample, "batched tensor": batched("cpu")}
        if torch.cuda.is_available():
            cases["batched tensor (cuda)"] = batched("cuda")
        for method, secs in time_interleaved(cases, args.repeats).items():
            best, median = min(secs), statistics.median(secs)
            rows.append({"threads": threads, "method": method, "images": n,
                         "images_per_s": n / median, "images_per_s_best": n / best,
                         "seconds_median": median})
            print(f"threads={threads}  {method:34s} {n / median:10.0f} img/s (median of "
                  f"{args.repeats}; best {n / best:.0f})")
    speedups = {}
    for threads in args.threads:
        by = {r["method"]: r["images_per_s"] for r in rows if r["threads"] == threads}
        speedups[str(threads)] = by["batched tensor"] / by["per-sample PIL (torchvision v2)"]
        print(f"threads={threads}  batched / per-sample = {speedups[str(threads)]:.1f}x")

    report = {
        "policy": {"name": "classic", "strength": 1.0, "params": PARAMS},
        "data": str(args.data), "image_size": list(size), "batch_size": bs,
        "repeats": args.repeats, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],  # other processes share the cores
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "results": rows, "speedup_batched_vs_per_sample": speedups,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "augment_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Augmentation throughput: batched tensor vs per-sample PIL",
        "",
        f"Policy `classic` {PARAMS} at strength 1 on {n} CIFAR-10 images {size[0]}x{size[1]}, "
        f"batch {bs}, decoded images in memory (JPEG decoding excluded); median of "
        f"{args.repeats} interleaved passes (best in brackets); torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, 1-min load average {os.getloadavg()[0]:.1f} at the end "
        f"(the cores are shared with other processes).",
        "",
        "| threads | method | images/s (best) | speed-up vs per-sample |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        base = next(b["images_per_s"] for b in rows if b["threads"] == r["threads"]
                    and b["method"].startswith("per-sample"))
        lines.append(f"| {r['threads']} | {r['method']} | {r['images_per_s']:,.0f} "
                     f"({r['images_per_s_best']:,.0f}) | "
                     f"{r['images_per_s'] / base:.1f}x |")
    (args.out / "augment_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'augment_throughput.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
