"""A disk too small for the run's checkpoints is refused before training starts."""

from __future__ import annotations

import subprocess

import pytest

from conftest import CONFIGS, need_shared
from trainers.recipe import load_config
from trainers.errors import SmallshotError
from trainers.loop import fit


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_fails_before_training(tiny_disk):
    need_shared("weights", "resnet_cifar10")
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={tiny_disk}", "train.progress=false", "model.name=cifar_resnet20",
        "data.channels=3", "data.mean=[0.3,0.3,0.3]", "data.std=[0.4,0.4,0.4]"])
    with pytest.raises(SmallshotError, match=r"MiB free on that disk, checkpoints .* need about"):
        fit(cfg)
    assert not list(tiny_disk.glob("*/checkpoints")), "nothing trained, nothing written"


def test_small_model_fits_the_same_disk(tiny_disk):
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [f"train.output_dir={tiny_disk}",
                                                     "train.progress=false", "train.epochs=1"])
    assert fit(cfg).metrics["test/accuracy"] > 0.1
