"""Image policies, mixing, the registry and the AugmentConfig bridge (fast, CPU)."""

from __future__ import annotations

import pytest
import torch

from augment import AugmentError, available, create_augment, register
from augment import registry
from augment.image import affine_grid, cutmix, mix_batch, mixup
from trainers.augmenting import build_batch_augment
from trainers.config import AugmentConfig
from trainers.recipe import load_config
from trainers.errors import ConfigError

IMAGE_POLICIES = available("image")


def batch(b: int = 6, c: int = 3, h: int = 24, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_builtin_image_policies_are_registered():
    assert {"none", "classic", "randaugment", "trivialaugment", "autoaugment"} <= \
        set(IMAGE_POLICIES)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", IMAGE_POLICIES)
def test_image_policy_keeps_shape_dtype_range_and_is_seeded(name: str, channels: int):
    x = batch(c=channels)
    policy = create_augment(name, modality="image", strength=0.8)
    a = policy(x, gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, policy(x, gen(1)))  # same seed, same batch
    if name != "none":
        assert not torch.equal(a, policy(x, gen(2)))
        assert not torch.equal(a, x)


@pytest.mark.parametrize("name", IMAGE_POLICIES)
def test_strength_zero_is_identity(name: str):
    x = batch()
    assert torch.equal(create_augment(name, modality="image", strength=0.0)(x, gen(0)), x)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment"])
def test_torchvision_policies_leave_the_global_rng_alone(name: str):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    create_augment(name, modality="image", strength=1.0)(batch(), gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_samples_of_a_batch_get_their_own_parameters():
    x = batch(b=1).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    for name in ["classic", "randaugment"]:
        out = create_augment(name, modality="image", strength=1.0)(x, gen(0))
        assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 1, name


def test_classic_pad_and_crop_is_an_exact_whole_pixel_shift():
    x = batch(b=16, h=12, w=12)
    policy = create_augment("classic", modality="image", strength=1.0, rotation=0, shift=0,
                            flip=False, pad=2)
    out = policy(x, gen(0))
    for xi, oi in zip(x, out):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(xi)
                ys, yd = slice(max(dy, 0), 12 + min(dy, 0)), slice(max(-dy, 0), 12 + min(-dy, 0))
                xs, xd = slice(max(dx, 0), 12 + min(dx, 0)), slice(max(-dx, 0), 12 + min(-dx, 0))
                shifted[:, yd, xd] = xi[:, ys, xs]
                matches.append(torch.allclose(oi, shifted, atol=1e-5))
        assert sum(matches) == 1


def test_classic_flip_only_gives_the_image_or_its_mirror():
    x = batch(b=32)
    out = create_augment("classic", modality="image", strength=1.0, rotation=0, shift=0,
                         flip=True)(x, gen(0))
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    assert all(s != m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < len(x)  # flip probability 0.5 at strength 1


def test_classic_strength_scales_the_ranges():
    full = create_augment("classic", modality="image", strength=1.0, rotation=20, shift=0.2,
                          flip=True)
    half = create_augment("classic", modality="image", strength=0.5, rotation=20, shift=0.2,
                          flip=True)
    assert (full.rotation, full.shift, full.flip_p) == (20, (0.2, 0.2), 0.5)
    assert (half.rotation, half.shift, half.flip_p) == (10, (0.1, 0.1), 0.25)
    rand = create_augment("randaugment", modality="image", strength=0.5)
    assert rand.transform.magnitude == 15


def test_classic_keras_example_is_one_config_line():
    cfg = load_config(None, ["data.format=digits", "augment.policy=classic", "augment.strength=1",
                             "augment.params={rotation: 20, shift: 0.2, flip: true}"])
    aug = build_batch_augment(cfg.augment, "image")
    assert aug.image_policy.rotation == 20 and aug.image_policy.shift == (0.2, 0.2)
    x = batch()
    assert aug.images(x, gen(0)).shape == x.shape


# ----------------------------------------------------------------------------------------------
# mixup / cutmix


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mixing_gives_soft_labels_that_sum_to_one(fn):
    x, y = batch(b=8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    xm, ym = fn(x, y, 4, 0.4, gen(0))
    assert xm.shape == x.shape and ym.shape == (8, 4) and ym.dtype == torch.float32
    assert torch.allclose(ym.sum(1), torch.ones(8))
    assert (ym >= 0).all() and xm.min() >= 0 and xm.max() <= 1
    again = fn(x, y, 4, 0.4, gen(0))
    assert torch.equal(xm, again[0]) and torch.equal(ym, again[1])
    assert not torch.equal(xm, x)


def test_cutmix_pixels_come_from_the_batch_and_labels_follow_the_area():
    x, y = batch(b=8, h=16, w=16), torch.arange(8)
    xm, ym = cutmix(x, y, 8, 1.0, gen(3))
    own = ym[torch.arange(8), torch.arange(8)]  # weight left on each sample's own class
    kept = (xm == x).all(dim=1).float().mean(dim=(1, 2))  # fraction of pixels still its own
    assert torch.allclose(own, kept, atol=1e-6)


def test_mix_passes_soft_targets_through_and_does_nothing_when_off():
    x = batch(b=4)
    soft = torch.full((4, 3), 1 / 3)
    _, ym = mix_batch(x, soft, 3, gen(0), mixup_alpha=0.2, cutmix_alpha=1.0)
    assert torch.allclose(ym.sum(1), torch.ones(4))
    xo, yo = mix_batch(x, torch.arange(4), 4, gen(0))
    assert xo is x and torch.equal(yo, torch.arange(4))


# ----------------------------------------------------------------------------------------------
# registry and config bridge


def test_unknown_policy_and_wrong_modality_name_the_policy():
    with pytest.raises(AugmentError, match=r"policy: 'rotate' is unknown .*classic"):
        create_augment("rotate", modality="image")
    with pytest.raises(ConfigError, match=r"augment\.policy: 'eda' is for text data .*classic"):
        build_batch_augment(AugmentConfig(policy="eda"), "image")
    with pytest.raises(ConfigError, match=r"augment\.policy: 'classic' is for image data .*eda"):
        build_batch_augment(AugmentConfig(policy="classic"), "text")


def test_unknown_or_bad_param_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"augment\.params\.rotatoin: unknown parameter of "
                       r"policy 'classic' \(allowed: rotation, shift, flip.*"
                       r"did you mean 'rotation'"):
        build_batch_augment(AugmentConfig(policy="classic", params={"rotatoin": 20}), "image")
    with pytest.raises(ConfigError, match=r"augment\.params\.rotation: expected a number"):
        build_batch_augment(AugmentConfig(policy="classic", params={"rotation": "lots"}), "image")
    with pytest.raises(AugmentError, match=r"strength: expected a number in \[0, 1\]"):
        create_augment("classic", modality="image", strength=1.5)


def test_build_batch_augment_modes():
    assert build_batch_augment(AugmentConfig(), "image") is None
    assert build_batch_augment(AugmentConfig(policy="classic", mode="materialised"),
                               "image") is None  # the copies carry the transform
    mix_only = build_batch_augment(AugmentConfig(mixup_alpha=0.2), "image")
    x = batch()
    assert mix_only.images(x, gen(0)) is x
    assert mix_only.mix(x, torch.arange(6) % 3, 3, gen(0))[1].shape == (6, 3)
    with pytest.raises(ConfigError, match=r"augment\.mixup_alpha: .*images only"):
        build_batch_augment(AugmentConfig(mixup_alpha=0.2), "text")
    with pytest.raises(ConfigError, match=r"augment\.mode: .*online"):
        build_batch_augment(AugmentConfig(policy="span_mask", mode="materialised"), "text")


@pytest.fixture
def scratch_policy():
    name = "invert_for_test"
    yield name
    registry._REGISTRY.pop(("image", name), None)


def test_a_new_policy_is_one_registered_function(scratch_policy: str):
    @register(scratch_policy, modality="image")
    def invert(*, strength: float, amount: float = 1.0):
        return lambda x, g: x + (1 - 2 * x) * amount * strength

    assert scratch_policy in available("image")
    aug = build_batch_augment(AugmentConfig(policy=scratch_policy, strength=1.0), "image")
    x = batch()
    assert torch.allclose(aug.images(x, gen(0)), 1 - x)
    with pytest.raises(ConfigError, match=r"params\.amout: .*allowed: amount"):
        build_batch_augment(AugmentConfig(policy=scratch_policy, params={"amout": 1}), "image")


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=gen(0))
    ref = torch.nn.functional.affine_grid(theta, [5, 1, 7, 11], align_corners=False)
    assert torch.allclose(affine_grid(theta, 7, 11), ref, atol=1e-6)
