"""Datasets, the few-shot sampler and stratified k-fold.

A dataset is loaded whole (few-shot data is small): texts stay strings (tokenised per batch, so
text augmentation can act on words), images become one float tensor in [0, 1]. The few-shot
draw happens before any augmentation, so augmented copies never cross train/eval splits.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from trainers import io, warm
from trainers.config import DataConfig
from trainers.errors import ConfigError, DataError
from trainers.registry import Registry

TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# A label of 10**9 would make a head of 10**9 outputs: class indices are bounded.
MAX_CLASSES = 100_000
# One image decoded to more pixels than this is refused before decoding (about 8k x 8k).
MAX_IMAGE_PIXELS = 64 * 2**20


@dataclass
class Split:
    """Examples of one split: ``inputs`` are texts or a float image tensor [N, C, H, W]."""

    inputs: list[str] | torch.Tensor
    labels: torch.Tensor
    sources: list[str] = field(default_factory=list)  # file:line or path, for messages
    classes: list[str] | None = None  # the class names, by label (what a strategy sees)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: Sequence[int]) -> Split:
        idx = list(idx)
        if isinstance(self.inputs, torch.Tensor):
            inputs = self.inputs[torch.as_tensor(idx, dtype=torch.long)]
        else:
            inputs = [self.inputs[i] for i in idx]
        sources = [self.sources[i] for i in idx] if self.sources else []
        return Split(inputs, self.labels[torch.as_tensor(idx, dtype=torch.long)], sources,
                     self.classes)


@dataclass
class FewShotData:
    """What a run trains, validates and tests on."""

    modality: str  # "text" | "image"
    classes: list[str]
    train: Split
    val: Split | None
    test: Split | None
    unlabeled: Split | None = None  # data.unlabeled, labels -1 (self-training)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_map(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


# --------------------------------------------------------------------------------------------
# Loaders (registry keyed by DataConfig.format)

Loader = Callable[[DataConfig], tuple[str, list[str], dict[str, Split]]]
LOADERS: Registry[Loader] = Registry("data format", "data.format")


BUNDLED = {"digits"}  # formats whose data ships with a package: no data.root


def register_loader(name: str) -> Callable[[Loader], Loader]:
    return LOADERS.register(name)


def check_data(cfg: DataConfig) -> Loader:
    """The loader of ``data.format``; a ConfigError when it is unknown or lacks its root."""
    loader = LOADERS.get(cfg.format)
    if cfg.format not in BUNDLED and not cfg.root:
        raise ConfigError(f"data.root: required for data.format={cfg.format!r}")
    return loader


def split_file(root: Path, split: str) -> Path | None:
    io.check_name(split, "data split name", itself=True)
    for suffix in TEXT_SUFFIXES:
        p = root / f"{split}{suffix}"
        if p.is_file():
            return p
    return None


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 ({e.reason})") from None


def _jsonl_rows(path: Path, raw: str) -> list[tuple[int, dict]]:
    """(physical line, object) per non-blank line; only \n ends a line (JSON strings may hold
    U+2028 and friends, which str.splitlines would split on)."""
    rows = []
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object per line")
        rows.append((n, row))
    return rows


def _delimited_rows(path: Path, raw: str, required: tuple[str, ...],
                    hint: str) -> list[tuple[int, dict]]:
    """(physical line where the record starts, row) for a TSV (no quoting) or CSV file.

    The csv module reads the whole text, so a quoted CSV field may span lines and line numbers
    stay the file's own; ``strict`` turns an unterminated or stray quote into an error instead of
    a field that silently swallows the rows after it.
    """
    tsv = path.suffix == ".tsv"
    reader = csv.reader(StringIO(raw, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    rows: list[tuple[int, dict]] = []
    header: list[str] | None = None
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            what = str(e)
            what = ("unterminated quote (the quoted field runs to the end of the file)"
                    if "end of data" in what else f"invalid {path.suffix[1:].upper()} ({what})")
            raise DataError(f"{path} line {start}: {what}") from None
        line, start = start, reader.line_num + 1
        if not values:
            continue
        if header is None:
            header = values
            twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
            if twice is not None:  # zip() would keep the last one silently
                raise DataError(f"{path} line {line}: column {twice!r} appears twice in the "
                                f"header")
            for col in required:
                if col not in header:
                    raise DataError(f"{path} line {line}: missing column {col!r} (columns: "
                                    f"{', '.join(header)}); {hint}")
            continue
        if len(values) != len(header):
            raise DataError(f"{path} line {line}: {len(values)} fields, header has "
                            f"{len(header)}")
        rows.append((line, dict(zip(header, values))))
    if header is None:
        raise DataError(f"{path}: empty file (expected a header row)")
    return rows


def read_text_file(path: Path, text_col: str, label_col: str | None, label_text_col: str | None,
                   hint: str = "set data.text_column/data.label_column"
                   ) -> tuple[list[str], list[int], list[str], dict[int, str]]:
    """Read TSV/CSV/JSONL rows; every malformed row is reported with file and physical line.

    ``label_col=None`` reads texts only (prediction): labels come back empty.
    """
    texts, labels, sources, names = [], [], [], {}
    raw = _decode(path)
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path, raw)
    else:
        required = tuple(c for c in (text_col, label_col) if c is not None)
        rows = _delimited_rows(path, raw, required, hint)
    if not rows:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    for n, row in rows:
        if text_col not in row or (label_col is not None and label_col not in row):
            missing = text_col if text_col not in row else label_col
            raise DataError(f"{path} line {n}: missing column {missing!r}")
        text = row[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {n}: empty text in column {text_col!r}")
        texts.append(text)
        sources.append(f"{path}:{n}")
        if label_col is None:
            continue
        label = row[label_col]
        try:
            if isinstance(label, bool) or (isinstance(label, float) and not label.is_integer()):
                raise ValueError
            label_i = int(label)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{path} line {n}: label {label!r} is not an integer class index") from None
        if label_i < 0:
            raise DataError(f"{path} line {n}: label {label_i} is negative")
        if label_i >= MAX_CLASSES:
            raise DataError(f"{path} line {n}: label {label_i} is too large (class indices "
                            f"are 0..C-1, at most {MAX_CLASSES - 1})")
        labels.append(label_i)
        if label_text_col and label_text_col in row:
            names.setdefault(label_i, str(row[label_text_col]))
    return texts, labels, sources, names


@register_loader("text")
def load_text(cfg: DataConfig) -> tuple[str, list[str], dict[str, Split]]:
    root = Path(cfg.root)
    splits: dict[str, Split] = {}
    names: dict[int, str] = {}
    wanted = [s for s in (cfg.train_split, cfg.test_split) if s]
    for split in wanted:
        path = root if root.is_file() else split_file(root, split)
        if path is None:
            raise DataError(f"data.root={cfg.root}: no {split}.tsv/.csv/.jsonl for split "
                            f"{split!r}")
        texts, labels, sources, n = read_text_file(path, cfg.text_column, cfg.label_column,
                                                   cfg.label_text_column)
        names.update(n)
        splits[split] = Split(texts, torch.tensor(labels, dtype=torch.long), sources)
    num_classes = max(int(s.labels.max()) for s in splits.values()) + 1
    train_labels = set(splits[cfg.train_split].labels.tolist())
    for s in splits.values():
        bad = [i for i, y in enumerate(s.labels.tolist()) if y not in train_labels]
        if bad:
            raise DataError(f"{s.sources[bad[0]]}: label {int(s.labels[bad[0]])} never occurs in "
                            f"split {cfg.train_split!r} (labels there: {sorted(train_labels)})")
    missing = sorted(set(range(num_classes)) - train_labels)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{cfg.root}: split {cfg.train_split!r} has no example of label(s) "
                        f"{shown}: labels must be 0..C-1")
    classes = [names.get(i, str(i)) for i in range(num_classes)]
    return "text", classes, splits


def load_image(path: Path | BinaryIO, size: int | None, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only: the size is known before decoding
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {im.width}x{im.height} pixels: larger than one image "
                                f"may be ({MAX_IMAGE_PIXELS // 2**20} Mpixel); downscale it")
            if size is not None:
                im.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode smaller
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # far above our own bound: Pillow refuses to open
        raise DataError(f"{path}: larger than one image may be ({MAX_IMAGE_PIXELS // 2**20} "
                        f"Mpixel): {str(e).split(',')[0]}; downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).splitlines()[0][:200]})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_classes(split_root: Path, depth: int) -> dict[str, Path]:
    """Class folders ``depth`` levels down; hidden ones (.ipynb_checkpoints, .git) are not
    classes, as in torchvision's ImageFolder."""
    dirs = [split_root]
    for _ in range(depth):
        dirs = sorted(d for parent in dirs for d in parent.iterdir()
                      if d.is_dir() and not d.name.startswith("."))
    return {str(d.relative_to(split_root)): d for d in dirs}


@register_loader("image_folder")
def load_image_folder(cfg: DataConfig) -> tuple[str, list[str], dict[str, Split]]:
    """root/<split>/<class>/*.png|jpg (class path of ``class_depth`` levels)."""
    root = Path(cfg.root)
    splits: dict[str, Split] = {}
    classes: list[str] | None = None
    for split in [s for s in (cfg.train_split, cfg.test_split) if s]:
        folder = io.child_path(root, split, "data split name", itself=True)
        split_root = folder if folder.is_dir() else None
        if split_root is None:
            if split == cfg.train_split and not cfg.test_split:
                split_root = root  # a single folder of classes; the test set is the remainder
            else:
                raise DataError(f"data.root={cfg.root}: no folder {split!r} for that split")
        found = image_classes(split_root, cfg.class_depth)
        if classes is None:
            classes = sorted(found)
            if cfg.max_classes:
                classes = classes[: cfg.max_classes]
        images, labels = [], []
        for label, name in enumerate(classes):
            if name not in found:
                raise DataError(f"{split_root}: class folder {name!r} is missing (it exists in "
                                f"split {cfg.train_split!r})")
            files = sorted(p for p in found[name].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not files:  # a class nothing trains or tests would still get a head output
                raise DataError(f"{found[name]}: class folder without images "
                                f"({', '.join(IMAGE_SUFFIXES)}); remove it or add examples")
            for p in files:
                images.append(p)
                labels.append(label)
        if not images:
            raise DataError(f"{split_root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        tensors = [load_image(p, cfg.image_size, cfg.channels) for p in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise DataError(f"{split_root}: images of different sizes {sorted(shapes)[:3]}; set "
                            f"data.image_size to resize them")
        splits[split] = Split(torch.stack(tensors).float().div_(255.0),
                              torch.tensor(labels, dtype=torch.long), [str(p) for p in images])
    assert classes is not None
    return "image", classes, splits


@register_loader("omniglot_run")
def load_omniglot_run(cfg: DataConfig) -> tuple[str, list[str], dict[str, Split]]:
    """One official Omniglot one-shot run: training/classNN.png (one drawing per class) and
    test/itemNN.png, labelled by class_labels.txt ('runNN/test/itemXX.png runNN/training/classYY.png')."""
    run = Path(cfg.root)
    support = sorted((run / "training").glob("*.png"))
    labels_file = run / "class_labels.txt"
    if not support or not labels_file.is_file():
        raise DataError(f"data.root={cfg.root}: not a one-shot run folder (expected training/"
                        f"*.png and class_labels.txt)")
    index = {p.name: i for i, p in enumerate(support)}
    load = lambda p: load_image(p, cfg.image_size, cfg.channels)  # noqa: E731
    splits = {cfg.train_split: Split(torch.stack([load(p) for p in support]).float() / 255.0,
                                     torch.arange(len(support)), [str(p) for p in support])}
    if cfg.test_split:
        queries, labels = [], []
        for n, line in enumerate(labels_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or Path(parts[1]).name not in index:
                raise DataError(f"{labels_file} line {n}: expected 'test/<item>.png "
                                f"training/<class>.png' naming a support image")
            queries.append(run / "test" / Path(parts[0]).name)
            labels.append(index[Path(parts[1]).name])
        splits[cfg.test_split] = Split(torch.stack([load(p) for p in queries]).float() / 255.0,
                                       torch.tensor(labels), [str(p) for p in queries])
    return "image", [p.stem for p in support], splits


@register_loader("digits")
def load_digits(cfg: DataConfig) -> tuple[str, list[str], dict[str, Split]]:
    """scikit-learn's bundled 8x8 digits (no download): a tiny real dataset for tests."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(12345)  # a fixed train/test split, independent of data.seed
    perm = rng.permutation(len(y))
    cut = int(0.7 * len(y))
    src = [f"digits[{i}]" for i in range(len(y))]
    make = lambda idx: Split(x[idx], y[idx], [src[i] for i in idx])  # noqa: E731
    return "image", [str(i) for i in range(10)], {cfg.train_split: make(perm[:cut].tolist()),
                                                  **({cfg.test_split: make(perm[cut:].tolist())}
                                                     if cfg.test_split else {})}


# --------------------------------------------------------------------------------------------
# Few-shot sampling and k-fold


def sample_few_shot(labels: Sequence[int], shots: int, seed: int,
                    exclude: set[int] | None = None, what: str = "train") -> list[int]:
    """Exactly ``shots`` indices per class, stratified, deterministic for ``seed``."""
    by_class: dict[int, list[int]] = {int(y): [] for y in labels}  # every class, even if used up
    for i, y in enumerate(labels):
        if exclude is None or i not in exclude:
            by_class[int(y)].append(i)
    rng = random.Random(seed)
    chosen = []
    for c in sorted(by_class):
        pool = by_class[c]
        if len(pool) < shots:
            raise DataError(f"data.shots={shots}: class {c} of the {what} split has only "
                            f"{len(pool)} example(s) available")
        chosen.extend(rng.sample(pool, shots))
    return sorted(chosen)


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """k disjoint folds covering every index, each with the classes in equal proportion."""
    if k < 2:
        raise DataError(f"k-fold needs k >= 2, got {k}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in sorted(by_class):
        idx = by_class[c][:]
        if len(idx) < k:
            raise DataError(f"data.folds={k}: class {c} has only {len(idx)} example(s)")
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(i)
        offset += len(idx)  # rotate so leftovers of each class spread over folds
    return [sorted(f) for f in folds]


def _stratified_subset(labels: Sequence[int], n: int, seed: int) -> list[int]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    rng = random.Random(seed)
    for pool in by_class.values():
        rng.shuffle(pool)
    out: list[int] = []
    classes = sorted(by_class)
    j = 0
    while len(out) < min(n, len(labels)):  # round-robin keeps the subset stratified
        pool = by_class[classes[j % len(classes)]]
        if pool:
            out.append(pool.pop())
        j += 1
    return sorted(out)


def load_dataset(cfg: DataConfig, with_test: bool = True) -> FewShotData:
    """Load the splits, draw the K-shot training set (and validation), cap the test set.

    With ``with_test=False`` the test split is never read, so whatever trains or selects on
    the result cannot see test labels.
    """
    loader = check_data(cfg)
    if not with_test and cfg.test_split:
        cfg = dataclasses.replace(cfg, test_split=None)
    # the files are read once per process; the draws below make new splits, never edit these
    modality, classes, splits = warm.keep("dataset", _source_key(cfg), lambda: loader(cfg))
    classes, splits = list(classes), dict(splits)
    if cfg.invert and modality == "image":
        splits = {k: Split(1.0 - s.inputs, s.labels, s.sources) for k, s in splits.items()}
    pool = splits[cfg.train_split]
    labels = pool.labels.tolist()
    if cfg.max_classes and len(classes) > cfg.max_classes:
        keep = [i for i, y in enumerate(labels) if y < cfg.max_classes]
        pool = pool.take(keep)
        labels = pool.labels.tolist()
        classes = classes[: cfg.max_classes]
        for name in list(splits):
            if name != cfg.train_split:
                s = splits[name]
                splits[name] = s.take([i for i, y in enumerate(s.labels.tolist())
                                       if y < cfg.max_classes])
    if len(set(labels)) < 2:
        raise DataError(f"{cfg.root or cfg.format}: split {cfg.train_split!r} has only one class; "
                        f"classification needs at least 2")
    if cfg.shots is None:
        train_idx = list(range(len(labels)))
    else:
        train_idx = sample_few_shot(labels, cfg.shots, cfg.seed, what=cfg.train_split)
    used = set(train_idx)
    val = None
    if cfg.folds:
        fold_labels = [labels[i] for i in train_idx]
        folds = stratified_folds(fold_labels, cfg.folds, cfg.seed)
        val_pos = set(folds[cfg.fold])
        val = pool.take([train_idx[p] for p in sorted(val_pos)])
        train_idx = [train_idx[p] for p in range(len(train_idx)) if p not in val_pos]
    elif cfg.val_shots:
        val_idx = sample_few_shot(labels, cfg.val_shots, cfg.seed + 7919, exclude=used,
                                  what=f"{cfg.train_split} (validation draw)")
        used |= set(val_idx)
        val = pool.take(val_idx)
    if not with_test:
        test = None
    elif cfg.test_split:
        test = splits[cfg.test_split]
    else:  # no test split: evaluate on what the draws left over
        rest = [i for i in range(len(labels)) if i not in used]
        test = pool.take(rest) if rest else None
    if test is not None and cfg.max_test and len(test) > cfg.max_test:
        test = test.take(_stratified_subset(test.labels.tolist(), cfg.max_test, seed=0))
    return FewShotData(modality, classes, pool.take(train_idx), val, test,
                       load_unlabeled(cfg, pool, used))


def load_unlabeled(cfg: DataConfig, pool: Split, used: set[int]) -> Split | None:
    """data.unlabeled without labels: the train split's undrawn examples (``used``: every drawn
    index, all k folds and the validation draw included) or a text file; at most
    data.max_unlabeled of them, a random subset for the draw's seed."""
    if cfg.unlabeled is None:
        return None
    if cfg.unlabeled == "rest":
        split = pool.take([i for i in range(len(pool)) if i not in used])
    else:
        texts, _, sources, _ = read_text_file(Path(cfg.unlabeled), cfg.text_column, None, None,
                                              hint="set data.text_column")
        split = Split(texts, torch.zeros(len(texts), dtype=torch.long), sources)
    rng = random.Random(cfg.seed + 104729)
    split = split.take(sorted(rng.sample(range(len(split)), min(len(split), cfg.max_unlabeled))))
    return Split(split.inputs, torch.full((len(split),), -1, dtype=torch.long), split.sources)


# what a loader reads (the draw's fields - shots, seed, folds, max_test - act after loading)
_SOURCE_FIELDS = ("format", "root", "train_split", "test_split", "text_column", "label_column",
                  "label_text_column", "class_depth", "image_size", "channels")


def _source_key(cfg: DataConfig) -> tuple:
    """The loader's inputs plus the state of the files, so an edited dataset is read again."""
    root = Path(cfg.root) if cfg.root else None
    files: tuple = ()
    if root is not None and root.is_dir():
        files = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                             for p in root.iterdir()))
    return tuple(getattr(cfg, f) for f in _SOURCE_FIELDS) + (files,)


def save_label_map(data: FewShotData, run_dir: Path) -> None:
    io.write_json(Path(run_dir) / "labels.json",
                  {"classes": data.classes, "label_to_index": data.label_map(),
                   "train_sources": data.train.sources})
