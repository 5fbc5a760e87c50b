"""One run folder, one writer, one consistent record: the lock, a SIGKILL inside a checkpoint
write, and what a finished run leaves on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, ROOT

import launch

TINY = str(CONFIGS / "tiny-digits.yaml")


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_second_run_on_a_busy_folder_refuses_and_appends_nothing(tmp_path, capsys):
    args = ["train", TINY, f"train.output_dir={tmp_path}", "train.run_name=shared",
            "train.epochs=40", "train.save_checkpoints=false"]
    first = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "shared"
    try:
        deadline = time.monotonic() + 400  # generous: the CPUs are shared
        while not rows(run) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert rows(run), "the first run never wrote a row"
        before = (run / "metrics.jsonl").read_bytes()
        code = launch.main(args)
        err = capsys.readouterr().err
        during = (run / "metrics.jsonl").read_bytes()
    finally:
        out, first_err = first.communicate(timeout=600)
    assert code == 2 and "in use by another run (pid " in err, err
    assert during.startswith(before)  # the refused run truncated and appended nothing
    assert first.returncode == 0, first_err[-2000:]
    history = rows(run)
    assert [r["epoch"] for r in history] == [float(e) for e in range(1, 41)]  # once each
    assert json.loads((run / "result.json").read_text())["metrics"]["epochs"] == 40


KILL_IN_THIRD_CHECKPOINT = """
import os, signal, sys
import torch
import launch
from trainers import engines

calls = []
original = engines.PlainEngine.save

def save(self, folder, rank):
    calls.append(folder)
    if len(calls) == 3:  # half-way through writing the third checkpoint
        torch.save(self.model_state(), folder / "model.pt")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, folder, rank)

engines.PlainEngine.save = save
sys.exit(launch.main(sys.argv[1:]))
"""


def test_sigkill_inside_a_checkpoint_write_then_resume_repeats_no_row(tmp_path):
    # one intra-op thread in both processes: the killed run's first epochs come from a
    # subprocess, and float sums split across a different number of threads differ in the ULP
    common = ["train", TINY, f"train.output_dir={tmp_path}", "train.epochs=5",
              "train.num_threads=1"]
    threads = torch.get_num_threads()
    try:
        _killed_then_resumed(tmp_path, common)
    finally:
        torch.set_num_threads(threads)


def _killed_then_resumed(tmp_path, common):
    killed = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_CHECKPOINT, *common,
                             "train.run_name=killed"], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed"
    assert [r["epoch"] for r in rows(run)] == [1.0, 2.0, 3.0]  # row 3 written, its checkpoint not
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000014"  # epoch 2 stays the latest
    assert list(ckpts.glob(".tmp-*")), "the killed write left its temporary folder"

    assert launch.main([*common, "train.run_name=killed", "train.resume=true"]) == 0
    assert launch.main([*common, "train.run_name=steady"]) == 0
    resumed, steady = rows(run), rows(tmp_path / "steady")
    assert [r["epoch"] for r in resumed] == [1.0, 2.0, 3.0, 4.0, 5.0]  # epoch 3 once, redone
    assert [r["val/accuracy"] for r in resumed] == [r["val/accuracy"] for r in steady]
    result = json.loads((run / "result.json").read_text())["metrics"]
    assert result == pytest.approx(json.loads((tmp_path / "steady" / "result.json").read_text())[
        "metrics"], abs=1e-9)
    assert not list(ckpts.glob(".tmp-*"))


@pytest.mark.slow
def test_finished_minilm_run_keeps_one_copy_of_its_weights(tmp_path):
    """A 2-step MiniLM run: only checkpoints/final (the tested weights) stays, once."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.tsv").write_text("label\ttext\n" + "".join(
        f"{i % 2}\t{'good' if i % 2 else 'bad'} movie number {i}\n" for i in range(16)))
    args = ["train", TINY, "data.format=text", f"data.root={root}", "model.name=minilm",
            "model.params={}",
            "data.shots=4", "data.val_shots=2", "data.test_split=null", "data.max_length=16",
            "train.batch_size=4", "train.max_steps=2", "train.epochs=1", "train.eval_every=1",
            "data.mean=[0.5]", "data.std=[0.5]", f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=minilm"]
    assert launch.main(args) == 0
    run = tmp_path / "runs" / "minilm"
    files = {p.relative_to(run).as_posix(): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    weights = files["checkpoints/final/model.pt"]
    total = sum(files.values())
    print(f"\nMiniLM 2-step run folder: {total / 2**20:.1f} MiB (weights {weights / 2**20:.1f} MiB)")
    assert not [f for f in files if f.startswith("checkpoints/step-")]
    assert not [f for f in files if f.endswith("engine.pt")]
    assert total < 1.1 * weights  # one copy of the weights, plus small records


def test_recipe_paths_resolve_against_the_recipe_and_are_saved_resolved(tmp_path, monkeypatch):
    """A recipe that names its data relatively runs from any folder; config.yaml keeps the
    resolved paths, so the saved config runs from anywhere too."""
    from test_bad_inputs import _images

    from trainers.recipe import load_config

    _images(tmp_path / "project" / "images", [(8, 8)] * 8)
    recipe = tmp_path / "project" / "recipes" / "r.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("name: rel\ndata:\n  format: image_folder\n  root: ../images\n"
                      "  test_split: null\n  shots: 2\n  val_shots: 1\n  channels: 3\n"
                      "  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n"
                      "model:\n  name: mlp:192\ntrain:\n  epochs: 1\n  progress: false\n"
                      "  output_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert launch.main(["train", str(recipe), "train.run_name=r"]) == 0
    run = elsewhere / "out" / "r"  # outputs stay relative to where the command ran
    saved = load_config(run / "config.yaml")
    assert saved.data.root == str(tmp_path / "project" / "images")
    assert saved.train.output_dir == str(elsewhere / "out")
    monkeypatch.chdir(tmp_path)  # the saved config needs no particular folder
    assert load_config(run / "config.yaml").data.root == saved.data.root
    # an override's relative path means the shell's folder, as on any command line
    cfg = load_config(recipe, ["data.root=project/images"])
    assert cfg.data.root == str(tmp_path / "project" / "images")
