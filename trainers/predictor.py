"""Use what was trained: find a model folder, load it with its preprocessing, predict in batches.

Three kinds of folder hold a model, and all load into one ``Predictor``:

    run folder      config.yaml, labels.json, checkpoints/final/model.pt (or the best step)
    sweep best/     config.yaml, model.pt, trial.json (written by `launch.py report`)
    export folder   smallshot-export.json + an HF folder, model.onnx or model.ts

Preprocessing always comes from the recipe the model was trained with (tokenizer max length,
image size, channels, normalisation), so a prediction sees exactly what training saw.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers import io
from trainers.batches import Batcher, inference_batches
from trainers.config import RunConfig, from_dict
from trainers.data import IMAGE_SUFFIXES, TEXT_SUFFIXES, load_image, read_text_file
from trainers.errors import DataError, SmallshotError
from trainers.models import BuiltModel
from trainers.recipe import load_config
from trainers.registry import Registry

EXPORT_RECORD = "smallshot-export.json"
WHAT = "a run folder, a sweep's best/ folder or a folder written by `launch.py export`"


class ModelFolderError(SmallshotError):
    """The folder given as a model is missing or holds no model smallshot can load."""


@dataclass
class ModelSource:
    """Where a model's weights are and what they need: recipe, class names, metrics."""

    folder: Path
    kind: str  # checkpoint | hf | onnx | torchscript
    cfg: RunConfig
    classes: list[str]
    weights: Path | None = None  # checkpoint kinds: the model.pt file
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # export folders: the export record

    @property
    def modality(self) -> str:
        return "text" if self.cfg.data.format == "text" else "image"


def _read_json(path: Path) -> Any:
    try:
        return io.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: unreadable ({e})") from None


def _checkpoint_weights(folder: Path) -> Path | None:
    """final/ first (the weights the test metrics came from), then the best step, then best/."""
    ckpts = folder / "checkpoints"
    candidates = [ckpts / "final" / "model.pt"]
    pointer = ckpts / "best"
    if pointer.is_file():
        candidates.append(ckpts / pointer.read_text().strip() / "model.pt")
    candidates.append(folder / "model.pt")
    return next((c for c in candidates if c.is_file()), None)


def labels_file(folder: Path) -> Path:
    """labels.json of a run folder, or of the trial run a sweep's best/ came from."""
    labels = folder / "labels.json"
    if not labels.is_file() and (folder / "trial.json").is_file():
        model = _read_json(folder / "trial.json").get("model")
        if model:
            run = Path(model).parent
            run = run.parent.parent if run.parent.name == "checkpoints" else run
            labels = run / "labels.json"
    if not labels.is_file():
        raise ModelFolderError(f"{folder}: no labels.json (the class names of the model)")
    return labels


def _classes(folder: Path) -> list[str]:
    labels = labels_file(folder)
    classes = _read_json(labels).get("classes")
    if not isinstance(classes, list) or not classes:
        raise ModelFolderError(f"{labels}: no 'classes' list")
    return [str(c) for c in classes]


def locate_model(path: str | Path) -> ModelSource:
    """What the folder holds, or a one-line error that says what was expected."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such folder (give {WHAT})")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: is a file; give the folder that holds it ({WHAT})")
    if (folder / EXPORT_RECORD).is_file():
        rec = _read_json(folder / EXPORT_RECORD)
        cfg = from_dict(rec.get("recipe"), source=str(folder / EXPORT_RECORD))
        return ModelSource(folder, rec.get("format", "?"), cfg, list(rec.get("classes") or []),
                           metrics=rec.get("metrics") or {}, record=rec)
    if (folder / "config.yaml").is_file():
        cfg = load_config(folder / "config.yaml", check_paths=False)
        weights = _checkpoint_weights(folder)
        if weights is None:
            raise ModelFolderError(f"{folder}: a run folder without weights (no checkpoints/final/"
                                   f"model.pt, best checkpoint or model.pt): did training finish?")
        metrics: dict[str, Any] = {}
        if (folder / "result.json").is_file():
            metrics = _read_json(folder / "result.json").get("metrics") or {}
        elif (folder / "trial.json").is_file():
            trial = _read_json(folder / "trial.json")
            metrics = {cfg.tune.metric: trial.get("score")}
        return ModelSource(folder, "checkpoint", cfg, _classes(folder), weights, metrics)
    if (folder / "best" / "config.yaml").is_file():
        raise ModelFolderError(f"{folder}: a sweep folder; give its best model: {folder / 'best'}")
    if (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: a Hugging Face folder smallshot did not export (no "
                               f"{EXPORT_RECORD}); train on it with model.name=hf:{folder}")
    raise ModelFolderError(f"{folder}: not a model folder (expected config.yaml with "
                           f"checkpoints/, best/model.pt, or {EXPORT_RECORD}; give {WHAT})")


# --------------------------------------------------------------------------------------------
# Forward functions, one per kind of folder: batch inputs -> logits (numpy)

Forward = Callable[[dict[str, torch.Tensor]], np.ndarray]


def _checkpoint_forward(src: ModelSource) -> tuple[Forward, Any]:
    from trainers.checkpoints import load_checkpoint_model
    from trainers.engines import autocast_dtype

    built = load_checkpoint_model(src.cfg, src.weights.parent, len(src.classes))
    module = built.module.eval()
    # the run's own precision, so `evaluate` scores a bf16 run as its test evaluation did
    # (exports are float32 models: their outputs differ from a bf16 run's in the 3rd digit);
    # a CUDA run in fp16 predicts in float32 here, as CPUs have no fp16 autocast
    cpu = torch.device("cpu")
    dtype = None if src.cfg.train.precision == "fp16" else autocast_dtype(src.cfg, cpu)

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return module(**inputs).float().numpy()
    return forward, built.tokenizer


def _hf_forward(src: ModelSource) -> tuple[Forward, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if src.record.get("custom_code"):
        # our own class, never the folder's copy of it: smallshot runs no code from a model folder
        from trainers.hf_modeling import SmallshotTextForSequenceClassification as cls
    else:
        cls = AutoModelForSequenceClassification
    model = cls.from_pretrained(src.folder).eval()

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return model(**inputs).logits.float().numpy()
    return forward, AutoTokenizer.from_pretrained(src.folder, trust_remote_code=False)


def _onnx_forward(src: ModelSource) -> tuple[Forward, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(src.folder / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tokenizer = None
    if src.modality == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src.folder)

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        feed = {n: inputs[n].numpy() for n in names}
        return session.run(None, feed)[0]
    return forward, tokenizer


def _torchscript_forward(src: ModelSource) -> tuple[Forward, Any]:
    module = torch.jit.load(str(src.folder / "model.ts"), map_location="cpu").eval()

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return module(inputs["pixels"]).float().numpy()
    return forward, None


FORWARDS: Registry[Callable[[ModelSource], tuple[Forward, Any]]] = Registry(
    "model format", f"{EXPORT_RECORD} format")
FORWARDS.register("checkpoint", _checkpoint_forward)
FORWARDS.register("hf", _hf_forward)
FORWARDS.register("onnx", _onnx_forward)
FORWARDS.register("torchscript", _torchscript_forward)


class Predictor:
    """A loaded model with its preprocessing: ``predict(texts or images) -> probabilities``."""

    def __init__(self, source: ModelSource):
        forward = FORWARDS.get(source.kind, field=f"{source.folder / EXPORT_RECORD} format")
        self.source = source
        self.classes = source.classes
        self.modality = source.modality
        with torch.inference_mode():
            self._forward, tokenizer = forward(source)
        # training's own preprocessing: the same tokenisation and normalisation
        self.batcher = Batcher(source.cfg, BuiltModel(None, (), tokenizer), torch.device("cpu"))

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.batcher.texts(list(texts))

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": self.batcher.images(images.float())}

    def logits(self, batch: Sequence[str] | torch.Tensor) -> np.ndarray:
        """Logits of one batch: a list of texts, or images as floats in [0, 1], [N, C, H, W]."""
        text = not isinstance(batch, torch.Tensor)
        if text != (self.modality == "text"):
            raise DataError(f"model {self.source.folder} takes {self.modality} input, got "
                            f"{'text' if text else 'images'}")
        inputs = self.encode_texts(batch) if text else self.encode_images(batch)
        try:
            with torch.inference_mode():
                return self._forward(inputs)
        except RuntimeError as e:  # e.g. images of another size than the model was trained on
            shape = tuple(next(iter(inputs.values())).shape)
            raise DataError(f"model {self.source.folder} cannot take inputs of shape {shape} "
                            f"({str(e).splitlines()[0][:160]})") from None

    def predict(self, inputs: Sequence[str] | torch.Tensor, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
        """Class probabilities [N, C], batch by batch (a progress bar when asked)."""
        from tqdm.auto import tqdm

        batches, restore = inference_batches(inputs, batch_size)
        out = []
        with tqdm(total=len(inputs), desc="predict", unit="ex", disable=not progress,
                  leave=False, file=sys.stderr) as bar:
            for idx in batches:
                logits = self.logits([inputs[i] for i in idx] if not torch.is_tensor(inputs)
                                     else inputs[torch.tensor(idx)])
                out.append(_softmax(logits))
                bar.update(len(logits))
        if not out:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(out)[restore.numpy()]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load_predictor(path: str | Path) -> Predictor:
    return Predictor(locate_model(path))


# --------------------------------------------------------------------------------------------
# Inputs: files read with the training readers, so column options mean the same thing


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(files: Sequence[Path], cfg: RunConfig) -> torch.Tensor:
    """Images as floats in [0, 1], resized and converted as the recipe says."""
    d = cfg.data
    tensors = [load_image(p, d.image_size, d.channels) for p in files]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes {sorted(shapes)[:3]} and the model's recipe "
                        f"has no data.image_size to resize them")
    return torch.stack(tensors).float().div_(255.0)


def read_inputs(path: str, source: ModelSource, text_column: str | None = None,
                stdin: Any = None) -> tuple[list[str] | torch.Tensor, list[str]]:
    """What to predict on, and a name per example (file:line or image path).

    Text models read a TSV/CSV/JSONL file (``text_column``, default the recipe's), or ``-``:
    one text per line on stdin. Image models read an image folder (recursively) or one image.
    """
    text_col = text_column or source.cfg.data.text_column
    if path == "-":
        if source.modality != "text":
            raise DataError(f"-: stdin holds text, but model {source.folder} takes images; give "
                            f"an image folder")
        lines = [ln.rstrip("\n") for ln in (stdin or sys.stdin)]
        texts = [ln for ln in lines if ln.strip()]
        ids = [f"stdin:{i}" for i, ln in enumerate(lines, 1) if ln.strip()]
        if not texts:
            raise DataError("-: stdin held no text (one text per line)")
        return texts, ids
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if source.modality == "text":
        if p.is_dir() or p.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(f"{p}: model {source.folder} takes text: give a "
                            f"{'/'.join(TEXT_SUFFIXES)} file with a {text_col!r} column, or - "
                            f"for one text per line on stdin")
        texts, _, ids, _ = read_text_file(p, text_col, None, None, hint="pass --text-column")
        if not texts:
            raise DataError(f"{p}: no rows to predict on")
        return texts, ids
    if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
        raise DataError(f"{p}: model {source.folder} takes images, not text; give an image "
                        f"folder or an image file ({', '.join(IMAGE_SUFFIXES)})")
    files = [p] if p.is_file() else _image_files(p)
    if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{p}: not an image ({', '.join(IMAGE_SUFFIXES)})")
    if not files:
        raise DataError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return load_images(files, source.cfg), [str(f) for f in files]


def prediction_rows(probs: np.ndarray, ids: list[str], classes: list[str]) -> list[dict[str, Any]]:
    """One row per example: id, predicted label index and text, and every class probability."""
    rows = []
    for name, pr in zip(ids, probs):
        k = int(pr.argmax())
        rows.append({"id": name, "label": k, "label_text": classes[k],
                     "probs": {c: round(float(v), 6) for c, v in zip(classes, pr)}})
    return rows


def write_predictions(rows: list[dict[str, Any]], out: Any, fmt: str) -> None:
    """TSV (id, label, label_text, p_<class>...) or JSONL, to an open text stream."""
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    classes = list(rows[0]["probs"]) if rows else []
    out.write("\t".join(["id", "label", "label_text", *(f"p_{c}" for c in classes)]) + "\n")
    for r in rows:
        values = [r["id"], str(r["label"]), r["label_text"], *(f"{v:.6f}" for v in r["probs"].values())]
        out.write("\t".join(v.replace("\t", " ") for v in values) + "\n")

