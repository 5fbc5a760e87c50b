"""Export a trained model for use outside smallshot: an HF folder, ONNX or TorchScript.

    hf           a folder `AutoModelForSequenceClassification.from_pretrained(DIR)` loads, with
                 the tokenizer and id2label/label2id, plus DIR/sentence-transformers (the body)
    onnx         model.onnx with dynamic batch (and sequence) axes, checked with onnxruntime
    torchscript  model.ts (image models)

Every export is written under a temporary name and renamed into place, and holds
``smallshot-export.json``: format, recipe, class names, metrics, the source checkpoint and its
sha256, and the largest difference to the PyTorch model's logits measured on probe inputs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainers import io
from trainers.batches import Batcher
from trainers.errors import SmallshotError
from trainers.io import sha256_of
from trainers.models import BuiltModel
from trainers.predictor import EXPORT_RECORD, ModelSource, labels_file, locate_model
from trainers.registry import Registry

PARITY_GOAL = 1e-4  # max |logit difference| an export should reach
PARITY_LIMIT = 1e-3  # beyond this the export is refused: it would predict something else
PINV_EPS = 1e-4  # scale that turns BERT's tanh pooler into (almost exactly) the identity
PROBE_TEXTS = ["a", "an unexpectedly moving film", "the plot never comes together , sadly",
               "short", "one of the most tedious hours i have ever sat through in a cinema ."]


class ExportError(SmallshotError):
    """The model cannot be exported in the asked format, or the export does not match it."""


def _merged(module: nn.Module) -> nn.Module:
    """Fold LoRA (peft) adapters into the base weights, so the export needs no peft."""
    for name, child in list(module.named_children()):
        if hasattr(child, "merge_and_unload"):
            setattr(module, name, child.merge_and_unload())
        else:
            _merged(child)
    return module


def _input_shape(src: ModelSource) -> tuple[int, int, int]:
    """(C, H, W) of the images the model was trained on."""
    d = src.cfg.data
    if d.image_size:
        return d.channels, d.image_size, d.image_size
    if d.format == "digits":
        return d.channels, 8, 8
    from trainers.data import load_image

    labels = io.read_json(labels_file(src.folder))
    for p in labels.get("train_sources", []):
        if Path(p).is_file():
            return tuple(load_image(Path(p), None, d.channels).shape)  # type: ignore[return-value]
    raise ExportError(f"{src.folder}: cannot tell the input image size (no data.image_size in "
                      f"the recipe and no training image to look at); set data.image_size")


def _probe_inputs(src: ModelSource, built: BuiltModel, batch: int) -> dict[str, torch.Tensor]:
    """Inputs to trace and to compare logits on: texts of several lengths, or random images."""
    if src.modality == "text":
        return Batcher(src.cfg, built, torch.device("cpu")).texts((PROBE_TEXTS * batch)[:batch])
    g = torch.Generator().manual_seed(batch)
    return {"pixels": torch.randn(batch, *_input_shape(src), generator=g)}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _reference(built: BuiltModel, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return built.module(**inputs).float().numpy()


# --------------------------------------------------------------------------------------------
# Formats


def _hf_classifier(built: BuiltModel, src: ModelSource) -> tuple[nn.Module, bool]:
    """The HF model to save, and whether it needs the bundled modeling file.

    First-token pooling without normalisation is what BERT-style ``*ForSequenceClassification``
    computes, up to its tanh pooler: a pooler of ``eps * I`` makes tanh linear to within
    (eps·h)²/3, and a classifier of ``W / eps`` undoes the scale. Anything else needs our class.
    """
    from transformers import AutoModelForSequenceClassification

    from trainers import hf_modeling

    module = built.module
    encoder = module.encoder
    classes = src.classes
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    if module.pooling == "cls" and not module.normalize:
        conf = encoder.config.__class__.from_dict({**encoder.config.to_dict(), **labels})
        hf = AutoModelForSequenceClassification.from_config(conf)
        body = getattr(hf, hf.base_model_prefix, None)
        pooler = getattr(body, "pooler", None)
        classifier = getattr(hf, "classifier", None)
        if (isinstance(getattr(pooler, "dense", None), nn.Linear)
                and isinstance(classifier, nn.Linear)):
            missing, unexpected = body.load_state_dict(encoder.state_dict(), strict=False)
            if unexpected or any(not k.startswith("pooler.") for k in missing):
                raise ExportError(f"{src.folder}: encoder weights do not fit "
                                  f"{type(hf).__name__} (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})")
            with torch.no_grad():
                dim = pooler.dense.weight.shape[0]
                pooler.dense.weight.copy_(torch.eye(dim) * PINV_EPS)
                pooler.dense.bias.zero_()
                classifier.weight.copy_(module.head.weight / PINV_EPS)
                classifier.bias.copy_(module.head.bias)
            return hf.eval(), False
    conf = hf_modeling.SmallshotTextConfig(
        encoder=encoder.config.to_dict(), pooling=module.pooling, normalize=module.normalize,
        architectures=["SmallshotTextForSequenceClassification"],
        auto_map={"AutoConfig": "modeling_smallshot.SmallshotTextConfig",
                  "AutoModelForSequenceClassification":
                      "modeling_smallshot.SmallshotTextForSequenceClassification"}, **labels)
    hf = hf_modeling.SmallshotTextForSequenceClassification(conf)
    hf.encoder.load_state_dict(encoder.state_dict())
    hf.head.load_state_dict(module.head.state_dict())
    return hf.eval(), True


def _save_sentence_transformer(built: BuiltModel, src: ModelSource, out: Path) -> None:
    """The fine-tuned body as a sentence-transformers model: encoder, pooling, normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    module = built.module
    module.encoder.save_pretrained(out)
    built.tokenizer.save_pretrained(out)
    mods = [modules.Transformer(str(out), max_seq_length=src.cfg.data.max_length),
            modules.Pooling(module.encoder.config.hidden_size, pooling_mode=module.pooling)]
    if module.normalize:
        mods.append(modules.Normalize())
    SentenceTransformer(modules=mods, device="cpu").save(str(out))


def export_hf(built: BuiltModel, src: ModelSource, tmp: Path) -> dict[str, Any]:
    if src.modality != "text":
        raise ExportError(f"{src.folder}: --format hf is for text models (this one takes "
                          f"images: use --format onnx or torchscript)")
    from transformers import AutoModelForSequenceClassification

    hf, custom = _hf_classifier(built, src)
    hf.save_pretrained(tmp)
    built.tokenizer.save_pretrained(tmp)
    if custom:
        from trainers import hf_modeling

        shutil.copy2(hf_modeling.__file__, tmp / "modeling_smallshot.py")
    _save_sentence_transformer(built, src, tmp / "sentence-transformers")
    # check what a user gets: the folder loaded back by transformers alone
    probe = _probe_inputs(src, built, 5)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp, trust_remote_code=custom)
    with torch.inference_mode():
        got = loaded.eval()(**probe).logits.float().numpy()
    return {"custom_code": custom, "max_abs_diff": _max_diff(got, _reference(built, probe)),
            "load_with": "AutoModelForSequenceClassification.from_pretrained(DIR"
                         + (", trust_remote_code=True)" if custom else ")")}


def export_onnx(built: BuiltModel, src: ModelSource, tmp: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from torch.export import Dim

    example = _probe_inputs(src, built, 2)
    names = list(example)
    axes: dict[int, Any] = {0: Dim("batch")}
    if src.modality == "text":
        axes[1] = Dim("sequence")
    torch.onnx.export(built.module.eval(), tuple(example.values()), str(tmp / "model.onnx"),
                      input_names=names, output_names=["logits"],
                      dynamic_shapes={n: axes for n in names}, dynamo=True, verbose=False)
    if built.tokenizer is not None:
        built.tokenizer.save_pretrained(tmp)
    # another batch size and sequence length than the traced ones: the axes really are dynamic
    probe = _probe_inputs(src, built, 5)
    session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: probe[n].numpy() for n in names})[0]
    return {"max_abs_diff": _max_diff(got, _reference(built, probe)),
            "inputs": {n: ["batch", "sequence"] if n != "pixels" else ["batch", "C", "H", "W"]
                       for n in names}, "onnxruntime": ort.__version__}


def export_torchscript(built: BuiltModel, src: ModelSource, tmp: Path) -> dict[str, Any]:
    if src.modality != "image":
        raise ExportError(f"{src.folder}: --format torchscript is for image models (this one "
                          f"takes text: use --format hf or onnx)")
    example = _probe_inputs(src, built, 2)["pixels"]
    with torch.inference_mode():
        traced = torch.jit.trace(built.module.eval(), example)
    traced.save(str(tmp / "model.ts"))
    probe = _probe_inputs(src, built, 5)
    loaded = torch.jit.load(str(tmp / "model.ts"))
    with torch.inference_mode():
        got = loaded(probe["pixels"]).numpy()
    return {"max_abs_diff": _max_diff(got, _reference(built, probe))}


EXPORTERS: Registry[Callable[[BuiltModel, ModelSource, Path], dict[str, Any]]] = Registry(
    "export format", "--format")
EXPORTERS.register("hf", export_hf)
EXPORTERS.register("onnx", export_onnx)
EXPORTERS.register("torchscript", export_torchscript)


def export_model(model: str | Path, fmt: str, out: str | Path, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Export the model in ``model`` (a run folder or sweep best/) to ``out``; the record."""
    exporter = EXPORTERS.get(fmt)
    src = locate_model(model)
    if src.kind != "checkpoint":
        raise ExportError(f"{src.folder}: already an export ({src.kind}); export from the run "
                          f"folder or sweep best/ it came from ({src.record.get('source')})")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not empty (pass --overwrite to replace "
                          f"it)")
    if out.resolve() == src.folder.resolve() or src.folder.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out}: inside the model folder {src.folder}; choose another")
    from trainers.checkpoints import load_checkpoint_model

    built = load_checkpoint_model(src.cfg, src.weights.parent, len(src.classes))
    built.module = _merged(built.module).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        details = exporter(built, src, tmp)
        diff = details.get("max_abs_diff")
        if diff is not None and not diff <= PARITY_LIMIT:
            raise ExportError(f"--format {fmt}: the export's logits differ from the model's by "
                              f"{diff:.2e} (limit {PARITY_LIMIT:g}); not written")
        record = {"format": fmt, **details, "parity_goal": PARITY_GOAL,
                  "source": str(src.folder), "source_checkpoint": str(src.weights),
                  "source_sha256": sha256_of(src.weights), "classes": src.classes,
                  "metrics": src.metrics, "recipe": src.cfg.to_dict()}
        io.write_json(tmp / EXPORT_RECORD, record)
        io.write_json(tmp / "labels.json", {"classes": src.classes})
        src.cfg.save(tmp / "smallshot-recipe.yaml")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)  # the export appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
