"""Model factory: real local weights load, heads are fresh, bad names/files are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import need_shared

from trainers.config import DataConfig, ModelConfig
from trainers.data import load_dataset
from trainers.errors import CheckpointError, ConfigError
from trainers.metrics import classification_metrics
from trainers.models import create_model, load_state_file


def test_cifar_resnet20_pretrained_scores_like_published():
    """Our ResNet-20 definition + the shared checkpoint: ~80 % on the JPEG test subset."""
    root = need_shared("data", "images", "cifar10")
    need_shared("weights", "resnet_cifar10")
    data = load_dataset(DataConfig(format="image_folder", root=str(root), shots=1,
                                   max_test=300))
    built = create_model(ModelConfig(name="cifar_resnet20"), num_classes=10)
    model = built.module.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model(pixels=(data.test.inputs - mean) / std).argmax(-1)
    acc = classification_metrics(data.test.labels, pred, 10)["accuracy"]
    assert acc > 0.7, acc


def test_cifar_resnet_fresh_head_for_other_class_counts():
    need_shared("weights", "resnet_cifar10")
    built = create_model(ModelConfig(name="cifar_resnet20", freeze_backbone=True), 5)
    assert built.module.linear.out_features == 5
    trainable = [n for n, p in built.module.named_parameters() if p.requires_grad]
    assert trainable == ["linear.weight", "linear.bias"]


def test_minilm_from_the_bundled_package():
    built = create_model(ModelConfig(name="minilm", pooling="mean"), num_classes=3)
    enc = built.tokenizer(["a tiny test", "another"], padding=True, return_tensors="pt")
    logits = built.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert logits.shape == (2, 3)
    n = sum(p.numel() for p in built.module.parameters())
    assert 22_000_000 < n < 23_500_000


def test_torchvision_resnet18_random_init_never_downloads():
    built = create_model(ModelConfig(name="torchvision:resnet18"), num_classes=4)
    out = built.module(pixels=torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 4)


@pytest.mark.parametrize("name,needle", [
    ("resnet9000", "unknown model"),
    ("cifar_resnet2O", "did you mean 'cifar_resnet20'"),
    ("torchvision:vit", "torchvision:vit"),
    ("hf:/no/such/folder", "folder not found"),
])
def test_unknown_models_are_named(name, needle):
    with pytest.raises(ConfigError, match=needle):
        create_model(ModelConfig(name=name), 2)


def test_bad_checkpoint_files(tmp_path):
    trunc = tmp_path / "trunc.th"
    trunc.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="trunc.th: cannot be loaded safely"):
        load_state_file(trunc)
    wrong = tmp_path / "wrong.th"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(CheckpointError, match="wrong.th: weights do not fit"):
        create_model(ModelConfig(name="cifar_resnet20", weights=str(wrong)), 10)
    unsafe = tmp_path / "unsafe.th"
    import argparse

    torch.save({"state_dict": {}, "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_file(unsafe)
