"""Using what was trained: predict, evaluate, export (HF, ONNX, TorchScript), and bad input.

Real models on small inputs: MiniLM trained for two steps on SST-2 (from ../shared), and an MLP
trained on scikit-learn's digits written out as a PNG image folder. Exports are loaded back by
the libraries users would load them with (transformers, sentence-transformers, onnxruntime,
torch.jit), never by smallshot's own code alone.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, need_shared

import launch
from trainers.loop import fit
from trainers.recipe import load_config

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate .",
             "it 's a charming and often affecting journey .", "dull , lifeless and irritating .",
             "an ambitious film that never quite comes together"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = launch.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(argv: list[str], capsys, *culprits: str) -> str:
    """The command fails with exit 2 and exactly one stderr line `error: ...` naming culprits."""
    rc, _, err = run_cli(argv, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for c in culprits:
        assert c in lines[0], f"{c!r} not named in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("use")


def minilm_run(work: Path, name: str, *extra: str) -> Path:
    """MiniLM, mean pooling (the sst2-minilm recipe), two optimizer steps on 4 shots/class."""
    cfg = load_config(CONFIGS / "sst2-minilm.yaml", [
        "data.root=" + str(need_shared("data", "text", "sst2")), "data.shots=4",
        "train.max_steps=2", "data.max_test=16", f"train.output_dir={work}/runs",
        f"train.run_name={name}", "train.progress=false", *extra])
    return fit(cfg).run_dir


@pytest.fixture(scope="module")
def text_run(work: Path) -> Path:
    return minilm_run(work, "text")


@pytest.fixture(scope="module")
def bf16_text_run(work: Path) -> Path:
    """The text run's recipe in bf16 autocast (as configs/fewshot-minilm.yaml on a CPU with
    bf16 arithmetic; emulated by torch on other CPUs)."""
    return minilm_run(work, "text-bf16", "train.precision=bf16")


@pytest.fixture(scope="module")
def cls_run(text_run: Path, work: Path) -> Path:
    """The same trained weights read with first-token pooling: the head BERT classes have."""
    folder = work / "runs" / "text-cls"
    shutil.copytree(text_run, folder)
    cfg = load_config(folder / "config.yaml", ["model.pooling=cls"], check_paths=False)
    cfg.save(folder / "config.yaml")
    return folder


def write_digits(root: Path) -> None:
    """scikit-learn's digits as root/<split>/<digit>/<n>.png (8x8 greyscale)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    for split, idx in (("train", order[:300]), ("test", order[300:400])):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def image_root(work: Path) -> Path:
    root = work / "digits"
    write_digits(root)
    return root


@pytest.fixture(scope="module")
def image_run(image_root: Path, work: Path) -> Path:
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [
        "data.format=image_folder", f"data.root={image_root}", "data.shots=10", "data.val_shots=0",
        "data.max_test=null", "train.epochs=3", f"train.output_dir={work}/runs",
        "train.run_name=image"])
    return fit(cfg).run_dir


def training_probs(run: Path, texts: list[str]) -> np.ndarray:
    """Probabilities through the training code path: checkpoint, Batcher, the module itself."""
    from trainers.batches import Batcher
    from trainers.checkpoints import load_checkpoint_model

    cfg = load_config(run / "config.yaml", check_paths=False)
    classes = json.loads((run / "labels.json").read_text())["classes"]
    built = load_checkpoint_model(cfg, run / "checkpoints" / "final", len(classes))
    with torch.no_grad():
        logits = built.module.eval()(**Batcher(cfg, built, torch.device("cpu")).texts(texts))
    return torch.softmax(logits.float(), -1).numpy()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# predict / evaluate


def test_predict_a_text_file_matches_the_training_forward_pass(text_run, work, capsys) -> None:
    src = work / "new.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    out = work / "pred.jsonl"
    rc, _, err = run_cli(["predict", str(text_run), str(src), "--out", str(out),
                          "--batch-size", "2"], capsys)
    assert rc == 0, err
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"{src}:{i}" for i in range(1, 6)]
    probs = np.array([list(r["probs"].values()) for r in rows])
    np.testing.assert_allclose(probs, training_probs(text_run, SENTENCES), atol=1e-5)
    assert [r["label_text"] for r in rows] == [["negative", "positive"][r["label"]] for r in rows]


def test_a_bf16_runs_predictor_runs_in_bf16(bf16_text_run) -> None:
    """A run trained in bf16 autocast predicts as its own test evaluation ran: in bf16 (the
    float32 forward differs by more than the tolerance, so precision is what is checked)."""
    from trainers.predictor import load_predictor

    probs = load_predictor(bf16_text_run).predict(SENTENCES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = training_probs(bf16_text_run, SENTENCES)
    np.testing.assert_allclose(probs, bf16, atol=1e-6)
    assert np.abs(probs - training_probs(bf16_text_run, SENTENCES)).max() > 1e-5


def test_a_cuda_fp16_run_predicts_in_float32_on_a_cpu(text_run, tmp_path) -> None:
    """A run trained in fp16 on a GPU (its config says so) still predicts on a CPU, in float32
    (CPUs have no fp16 autocast), as the same weights do in a float32 run."""
    from trainers.predictor import load_predictor

    run = tmp_path / "fp16-run"
    shutil.copytree(text_run, run)
    conf = run / "config.yaml"
    conf.write_text(conf.read_text().replace("precision: auto", "precision: fp16"))
    assert "precision: fp16" in conf.read_text()
    np.testing.assert_allclose(load_predictor(run).predict(SENTENCES),
                               training_probs(text_run, SENTENCES), atol=1e-5)


def test_predict_reads_stdin_and_writes_tsv(text_run, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SENTENCES[:2]) + "\n\n"))
    rc, out, err = run_cli(["predict", str(text_run), "-", "--no-progress"], capsys)
    assert rc == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split("\t") == ["id", "label", "label_text", "p_negative", "p_positive"]
    assert [r.split("\t")[0] for r in rows] == ["stdin:1", "stdin:2"]
    expected = training_probs(text_run, SENTENCES[:2])
    got = np.array([[float(v) for v in r.split("\t")[3:]] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("which", ["text_run", "bf16_text_run"])
def test_evaluate_text_equals_the_runs_own_test_metrics(which, work, capsys, request) -> None:
    """The run's test split (16 fixed examples) scored by evaluate == fit's test/ metrics, in
    the run's own precision (a bf16 run's logits differ from float32's in the 3rd digit)."""
    from trainers.data import load_dataset

    run = request.getfixturevalue(which)
    cfg = load_config(run / "config.yaml", check_paths=False)
    test = load_dataset(cfg.data).test
    labelled = work / "test16.tsv"
    labelled.write_text("label\ttext\n" + "".join(
        f"{y}\t{t}\n" for t, y in zip(test.inputs, test.labels.tolist())))
    rc, out, err = run_cli(["evaluate", str(run), str(labelled), "--out",
                            str(work / f"eval-{which}")], capsys)
    assert rc == 0, err
    got = json.loads((work / f"eval-{which}" / "metrics.json").read_text())
    want = json.loads((run / "result.json").read_text())["metrics"]
    for k in ("accuracy", "f1", "precision", "recall", "mcc"):
        assert got[k] == pytest.approx(want[f"test/{k}"], abs=1e-9), k
    assert "| negative |" in out
    assert (work / f"eval-{which}" / "confusion.png").stat().st_size > 1000


def test_predict_and_evaluate_an_image_model(image_run, image_root, work, capsys) -> None:
    out = work / "img.jsonl"
    rc, _, err = run_cli(["predict", str(image_run), str(image_root / "test" / "3"), "--out",
                          str(out)], capsys)
    assert rc == 0, err
    rows = read_jsonl(out)
    assert len(rows) == len(list((image_root / "test" / "3").iterdir()))
    assert all(set(r["probs"]) == {str(i) for i in range(10)} for r in rows)
    rc, _, err = run_cli(["evaluate", str(image_run), str(image_root), "--out",
                          str(work / "eval-img")], capsys)
    assert rc == 0, err
    got = json.loads((work / "eval-img" / "metrics.json").read_text())
    want = json.loads((image_run / "result.json").read_text())["metrics"]
    assert got["examples"] == 100
    assert got["accuracy"] == pytest.approx(want["test/accuracy"], abs=1e-9)
    assert got["mcc"] == pytest.approx(want["test/mcc"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# export


def test_hf_export_loads_in_plain_transformers_with_the_same_predictions(cls_run, work,
                                                                          capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = work / "hf-cls"
    rc, _, err = run_cli(["export", str(cls_run), "--format", "hf", "--out", str(out)],
                              capsys)
    assert rc == 0, err
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no remote code
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(probs, training_probs(cls_run, SENTENCES), atol=1e-5)
    rec = json.loads((out / "smallshot-export.json").read_text())
    assert rec["custom_code"] is False and rec["max_abs_diff"] <= 1e-4
    assert rec["source_sha256"] == __import__("trainers.export").export.sha256_of(
        cls_run / "checkpoints" / "final" / "model.pt")
    assert rec["classes"] == ["negative", "positive"] and "test/accuracy" in rec["metrics"]
    assert rec["recipe"]["model"]["pooling"] == "cls"


def test_hf_export_of_a_mean_pooled_model_and_its_sentence_transformers_body(text_run, work,
                                                                            capsys) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.checkpoints import load_checkpoint_model

    out = work / "hf-mean"
    rc, stdout, err = run_cli(["export", str(text_run), "--format", "hf", "--out", str(out)],
                              capsys)
    assert rc == 0, err
    assert "trust_remote_code=True" in stdout
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model.eval()(**enc).logits, -1).numpy()
    np.testing.assert_allclose(probs, training_probs(text_run, SENTENCES), atol=1e-5)
    # the body: sentence-transformers' embeddings are the classifier's pooled sentence vectors
    cfg = load_config(text_run / "config.yaml", check_paths=False)
    built = load_checkpoint_model(cfg, text_run / "checkpoints" / "final", 2)
    body = SentenceTransformer(str(out / "sentence-transformers"), device="cpu")
    with torch.no_grad():
        ours = built.module.eval().embed(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(body.encode(SENTENCES), ours, atol=1e-5)
    # smallshot's own predict reads the export folder too
    from trainers.predictor import load_predictor

    np.testing.assert_allclose(load_predictor(out).predict(SENTENCES),
                               training_probs(text_run, SENTENCES), atol=1e-5)


@pytest.mark.slow
def test_onnx_export_of_minilm_matches_pytorch_in_onnxruntime(text_run, work, capsys) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = work / "onnx-text"
    rc, _, err = run_cli(["export", str(text_run), "--format", "onnx", "--out", str(out)],
                              capsys)
    assert rc == 0, err
    rec = json.loads((out / "smallshot-export.json").read_text())
    assert rec["max_abs_diff"] <= 1e-4, rec["max_abs_diff"]
    # batch 5 and their own sequence length: neither is the traced shape (2 probe texts)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": enc["input_ids"],
                                "attention_mask": enc["attention_mask"]})[0]
    z = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(z / z.sum(-1, keepdims=True), training_probs(text_run, SENTENCES),
                               atol=1e-4)


def test_image_exports_torchscript_and_onnx_predict_like_the_run(image_run, image_root, work,
                                                                 capsys) -> None:
    from trainers.predictor import load_images, load_predictor

    files = sorted((image_root / "test" / "7").glob("*.png"))
    images = load_images(files, load_predictor(image_run).source.cfg)
    want = load_predictor(image_run).predict(images)
    for fmt in ("torchscript", "onnx"):
        out = work / f"img-{fmt}"
        rc, _, err = run_cli(["export", str(image_run), "--format", fmt, "--out", str(out)],
                             capsys)
        assert rc == 0, err
        assert json.loads((out / "smallshot-export.json").read_text())["max_abs_diff"] <= 1e-4
        np.testing.assert_allclose(load_predictor(out).predict(images), want, atol=1e-5)
    loaded = torch.jit.load(str(work / "img-torchscript" / "model.ts"))  # plain torch.jit
    assert loaded(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


# --------------------------------------------------------------------------------------------
# bad input: one line naming the culprit


def test_bad_model_folders(work, text_run, capsys) -> None:
    one_line_error(["predict", str(work / "nope"), "-"], capsys, "nope", "no such folder")
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    one_line_error(["predict", str(empty), "-"], capsys, "empty", "not a model folder")
    sweep = work / "sweep"
    (sweep / "best").mkdir(parents=True, exist_ok=True)
    shutil.copy(text_run / "config.yaml", sweep / "best" / "config.yaml")
    one_line_error(["export", str(sweep), "--format", "hf", "--out", str(work / "x")], capsys,
                   "sweep folder", str(sweep / "best"))
    no_weights = work / "no-weights"
    no_weights.mkdir(exist_ok=True)
    shutil.copy(text_run / "config.yaml", no_weights / "config.yaml")
    one_line_error(["evaluate", str(no_weights), "x.tsv"], capsys, "no-weights", "without weights")
    file_model = text_run / "config.yaml"
    one_line_error(["serve", str(file_model)], capsys, "is a file")


def test_bad_inputs_to_predict_and_evaluate(text_run, image_run, image_root, work,
                                            capsys) -> None:
    wrong_col = work / "wrong.tsv"
    wrong_col.write_text("sentence\tlabel\ngood film\t1\n")
    one_line_error(["predict", str(text_run), str(wrong_col)], capsys, "missing column 'text'",
                   "--text-column")
    header_only = work / "header.tsv"
    header_only.write_text("text\n")
    one_line_error(["predict", str(text_run), str(header_only)], capsys, "header.tsv", "no examples")
    one_line_error(["predict", str(image_run), str(wrong_col)], capsys, "takes images")
    one_line_error(["predict", str(text_run), str(image_root / "test")], capsys, "takes text")
    bad_label = work / "bad-label.tsv"
    bad_label.write_text("text\tlabel\nfine\t0\nodd\t7\n")
    one_line_error(["evaluate", str(text_run), str(bad_label)], capsys, "bad-label.tsv:3",
                   "label 7")
    odd = work / "odd-classes"
    (odd / "cat").mkdir(parents=True, exist_ok=True)
    one_line_error(["evaluate", str(image_run), str(odd)], capsys, "cat", "not classes")


def test_bad_exports(text_run, image_run, work, capsys) -> None:
    one_line_error(["export", str(text_run), "--format", "torchscript", "--out",
                    str(work / "t")], capsys, "torchscript is for image models")
    one_line_error(["export", str(image_run), "--format", "hf", "--out", str(work / "h")],
                   capsys, "hf is for text models")
    taken = work / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "keep.txt").write_text("x")
    one_line_error(["export", str(image_run), "--format", "onnx", "--out", str(taken)], capsys,
                   "taken", "not empty")
    assert (taken / "keep.txt").read_text() == "x"


def test_unknown_tracking_backend_is_refused(capsys) -> None:
    one_line_error(["train", str(CONFIGS / "tiny-digits.yaml"), "track.backends=[wandb]"],
                   capsys, "track.backends", "wandb")


def test_lora_adapters_are_merged_before_export() -> None:
    """A peft-wrapped encoder is folded into plain weights with the same logits."""
    from peft import LoraConfig, get_peft_model

    from trainers.config import ModelConfig
    from trainers.export import _merged
    from trainers.models import create_model

    built = create_model(ModelConfig(name="minilm", pooling="mean"), 2)
    module = built.module.eval()
    module.encoder = get_peft_model(module.encoder, LoraConfig(r=4, lora_alpha=8,
                                                               target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter change something
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    enc = built.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = module(enc["input_ids"], enc["attention_mask"])
        merged = _merged(module)
        after = merged(enc["input_ids"], enc["attention_mask"])
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
