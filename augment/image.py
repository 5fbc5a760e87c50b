"""Image policies on batched float tensors [B, C, H, W] in [0, 1], on the batch's device.

Every random number comes from the ``torch.Generator`` passed in, so a batch's augmentation is
reproducible from the generator's seed. ``classic`` draws one affine matrix per sample and warps
the whole batch with a single ``affine_grid`` + ``grid_sample``; the torchvision auto-augment
family is applied per sample under a seed drawn from the generator (their ops are per call).
Parameters give a policy's full range, reached at strength 1; strength scales it down linearly
(or, where a policy has no magnitude, is the probability a sample is augmented); strength 0 is
the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from augment.registry import AugmentError, boolean, choice, integer, number, register

_SEED_HIGH = 2**62
FILLS = ("zeros", "border", "reflection")  # grid_sample padding modes


def check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
            else type(x).__name__
        raise AugmentError("inputs", f"expected a float tensor [B, C, H, W] in [0, 1], got {what}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device, dtype=torch.float64) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device, dtype=torch.float64) < p


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, ..., align_corners=False)`` as one [HW, 3] x [3, 2B] matmul,
    several times faster on CPU than its batched small matmuls."""
    kw = {"device": theta.device, "dtype": theta.dtype}
    xs = (torch.arange(width, **kw) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(height, **kw) * 2 + 1) / height - 1
    base = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None], torch.ones(1, 1, **kw)),
                       dim=-1).view(height * width, 3)
    return torch.einsum("pk,bjk->bpj", base, theta).view(theta.shape[0], height, width, 2)


# ----------------------------------------------------------------------------------------------
# classic: rotation, shifts, flips, zoom, random resized crop, pad-and-crop as one affine warp


@dataclass(frozen=True)
class ClassicPolicy:
    """Per-sample affine warp; every range is already scaled by strength."""

    level: ClassVar[str] = "image"
    rotation: float  # max degrees either way
    shift: tuple[float, float]  # max fraction of width, height
    flip_p: float
    vflip_p: float
    zoom: float  # scale factor drawn in [1 - zoom, 1 + zoom]
    crop_scale: float  # min area fraction of the random resized crop (1 = off)
    crop_ratio: float  # max |log aspect ratio| of the crop
    pad: int  # pad-and-crop: integer shift of up to `pad` pixels
    fill: str

    @property
    def is_identity(self) -> bool:
        return not (self.rotation or any(self.shift) or self.flip_p or self.vflip_p or self.zoom
                    or self.crop_scale < 1.0 or self.pad)

    def matrices(self, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """[n, 2, 3] maps from output to input coordinates (affine_grid's convention)."""
        angle = torch.deg2rad(_uniform(n, -self.rotation, self.rotation, g))
        tx = _uniform(n, -self.shift[0], self.shift[0], g) * 2  # normalised coords span 2
        ty = _uniform(n, -self.shift[1], self.shift[1], g) * 2
        if self.pad:  # whole-pixel shifts land on pixel centres: pad-and-crop is exact
            px = torch.randint(-self.pad, self.pad + 1, (2, n), generator=g, device=g.device)
            tx = tx + px[0].double() * 2 / width
            ty = ty + px[1].double() * 2 / height
        sx = torch.where(_bernoulli(n, self.flip_p, g), -1.0, 1.0).double()
        sy = torch.where(_bernoulli(n, self.vflip_p, g), -1.0, 1.0).double()
        zoom = _uniform(n, 1 - self.zoom, 1 + self.zoom, g)
        # random resized crop: the window's size (cw, ch) and centre (cx, cy) in input coords
        area = _uniform(n, self.crop_scale, 1.0, g)
        log_r = _uniform(n, -self.crop_ratio, self.crop_ratio, g)
        cw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        ch = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        cx = _uniform(n, -1.0, 1.0, g) * (1 - cw)
        cy = _uniform(n, -1.0, 1.0, g) * (1 - ch)
        cos, sin = torch.cos(angle), torch.sin(angle)
        aspect = height / width  # rotate in pixel space, not in the squashed normalised space
        m = torch.empty(n, 2, 3, dtype=torch.float64, device=g.device)
        m[:, 0, 0] = cw * cos * sx / zoom
        m[:, 0, 1] = cw * -sin * aspect * sy / zoom
        m[:, 1, 0] = ch * sin / aspect * sx / zoom
        m[:, 1, 1] = ch * cos * sy / zoom
        m[:, 0, 2] = cw * tx + cx
        m[:, 1, 2] = ch * ty + cy
        return m

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_batch(x)
        if self.is_identity:
            return x
        theta = self.matrices(x.shape[0], x.shape[2], x.shape[3], generator)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = affine_grid(theta, x.shape[2], x.shape[3])
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.fill, align_corners=False)
        return out.clamp_(0.0, 1.0)  # bilinear weights can overshoot by rounding

    def to_torchvision(self, size: tuple[int, int]) -> v2.Compose:
        """The same policy as a per-image torchvision v2 pipeline (for PIL or single tensors)."""
        if self.fill != "zeros":
            raise AugmentError("params.fill", "the per-image torchvision pipeline fills with zeros")
        steps: list[v2.Transform] = []
        if self.pad:
            steps.append(v2.RandomCrop(size, padding=self.pad))
        if self.crop_scale < 1.0:
            r = math.exp(self.crop_ratio)
            steps.append(v2.RandomResizedCrop(size, scale=(self.crop_scale, 1.0), ratio=(1 / r, r),
                                              antialias=True))
        if self.rotation or any(self.shift) or self.zoom:
            steps.append(v2.RandomAffine(degrees=self.rotation, translate=self.shift,
                                         scale=(1 - self.zoom, 1 + self.zoom),
                                         interpolation=v2.InterpolationMode.BILINEAR))
        steps.append(v2.RandomHorizontalFlip(self.flip_p))
        steps.append(v2.RandomVerticalFlip(self.vflip_p))
        return v2.Compose(steps)


@register("classic", modality="image")
def classic(*, strength: float, rotation: float = 15.0, shift: float | list[float] = 0.1,
            flip: bool = True, vflip: bool = False, zoom: float = 0.0, crop_scale: float = 1.0,
            pad: int = 0, fill: str = "zeros") -> ClassicPolicy:
    """Rotation (degrees), width/height shift (fraction), flips, zoom, random resized crop
    (min area crop_scale), pad-and-crop (pixels); the values are reached at strength 1, e.g.
    the Keras-style ``augment.strength=1 augment.params={rotation: 20, shift: 0.2, flip: true}``.
    ``fill: border`` suits images on a white background (Omniglot)."""
    if isinstance(shift, (list, tuple)):
        if len(shift) != 2:
            raise AugmentError("params.shift", f"expected one fraction or [width, height], "
                               f"got {shift!r}")
        shifts = (number("shift", shift[0], 0, 1), number("shift", shift[1], 0, 1))
    else:
        s = number("shift", shift, 0, 1)
        shifts = (s, s)
    s = strength
    return ClassicPolicy(
        rotation=number("rotation", rotation, 0, 180) * s,
        shift=(shifts[0] * s, shifts[1] * s),
        flip_p=0.5 * s if boolean("flip", flip) else 0.0,
        vflip_p=0.5 * s if boolean("vflip", vflip) else 0.0,
        zoom=number("zoom", zoom, 0, 0.9) * s,
        crop_scale=1.0 - (1.0 - number("crop_scale", crop_scale, 0.01, 1.0)) * s,
        crop_ratio=math.log(4 / 3) * s if crop_scale < 1.0 else 0.0,
        pad=round(integer("pad", pad, 0, 1024) * s),
        fill=choice("fill", fill, FILLS),
    )


@dataclass(frozen=True)
class IdentityImage:
    level: ClassVar[str] = "image"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_batch(x)
        return x


@register("none", modality="image")
def none(*, strength: float) -> IdentityImage:
    """No augmentation."""
    return IdentityImage()


# ----------------------------------------------------------------------------------------------
# torchvision's auto-augment family, seeded per sample


@dataclass(frozen=True)
class SeededPerSample:
    """Apply a per-call-random torchvision transform to each sample with probability ``p``,
    under a seed drawn from the caller's generator, leaving the global RNG as it was."""

    level: ClassVar[str] = "image"
    transform: v2.Transform
    p: float

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_batch(x)
        n = x.shape[0]
        seeds = torch.randint(_SEED_HIGH, (n,), generator=generator, device=generator.device)
        chosen = _bernoulli(n, self.p, generator).tolist()
        if not any(chosen):
            return x
        out = x.clone()
        # torchvision draws its choices from the CPU default generator
        with torch.random.fork_rng(devices=[]):
            for i, seed in enumerate(seeds.tolist()):
                if chosen[i]:
                    torch.default_generator.manual_seed(seed)
                    out[i] = self.transform(x[i])
        return out


@register("randaugment", modality="image")
def randaugment(*, strength: float, num_ops: int = 2, magnitude: int | None = None,
                num_magnitude_bins: int = 31) -> SeededPerSample:
    """RandAugment(N=num_ops, M); M = strength x (bins - 1) unless magnitude is given."""
    bins = integer("num_magnitude_bins", num_magnitude_bins, 2, 1000)
    m = round(strength * (bins - 1)) if magnitude is None \
        else integer("magnitude", magnitude, 0, bins - 1)
    t = v2.RandAugment(num_ops=integer("num_ops", num_ops, 1, 16), magnitude=m,
                       num_magnitude_bins=bins)
    return SeededPerSample(t, 1.0 if strength > 0 else 0.0)


@register("trivialaugment", modality="image")
def trivialaugment(*, strength: float, num_magnitude_bins: int = 31) -> SeededPerSample:
    """TrivialAugment (wide); strength is the probability a sample is augmented."""
    bins = integer("num_magnitude_bins", num_magnitude_bins, 2, 1000)
    return SeededPerSample(v2.TrivialAugmentWide(num_magnitude_bins=bins), strength)


AUTOAUGMENT_POLICIES = {p.value: p for p in v2.AutoAugmentPolicy}


@register("autoaugment", modality="image")
def autoaugment(*, strength: float, policy: str = "cifar10") -> SeededPerSample:
    """AutoAugment's learned policy (cifar10, imagenet, svhn); strength is the probability a
    sample is augmented."""
    name = choice("policy", policy, tuple(AUTOAUGMENT_POLICIES))
    return SeededPerSample(v2.AutoAugment(AUTOAUGMENT_POLICIES[name]), strength)


# ----------------------------------------------------------------------------------------------
# Batch-level mixing with soft labels


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta sampler takes no generator: seed numpy's from ours instead
    seed = int(torch.randint(_SEED_HIGH, (1,), generator=g, device=g.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices [B] -> one-hot float [B, C]; float [B, C] targets pass through."""
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise AugmentError("targets", f"expected [B, {num_classes}] soft targets, got "
                               f"{tuple(targets.shape)}")
        return targets
    return F.one_hot(targets.long(), num_classes).float()


def _partners(x: torch.Tensor, targets: torch.Tensor, num_classes: int, alpha: float,
              generator: torch.Generator) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Soft targets, a Beta(alpha, alpha) weight and a partner permutation for batch mixing."""
    check_batch(x)
    y = soft_targets(targets, num_classes)
    lam = _beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device)
    return y, lam, perm


def mixup(x: torch.Tensor, targets: torch.Tensor, num_classes: int, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample with a partner from the same batch: lam*x + (1-lam)*x[perm]."""
    y, lam, perm = _partners(x, targets, num_classes, alpha, generator)
    perm = perm.to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm.to(y.device)]


def cutmix(x: torch.Tensor, targets: torch.Tensor, num_classes: int, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a box from a partner sample; labels weighted by the pasted area."""
    y, lam, perm = _partners(x, targets, num_classes, alpha, generator)
    h, w = x.shape[2], x.shape[3]
    cut = math.sqrt(1.0 - lam)
    cy, cx = (torch.rand(2, generator=generator, device=generator.device) *
              torch.tensor([h, w], device=generator.device)).long().tolist()
    y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
    x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm.to(x.device)][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the box was clipped: use its real area
    return out, lam * y + (1 - lam) * y[perm.to(y.device)]


def mix_batch(x: torch.Tensor, targets: torch.Tensor, num_classes: int,
              generator: torch.Generator, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of them per batch, evenly, when both are on); soft labels out."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(torch.rand((), generator=generator, device=generator.device) < 0.5)
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0
    else:
        return x, targets
    if use_cutmix:
        return cutmix(x, targets, num_classes, cutmix_alpha, generator)
    return mixup(x, targets, num_classes, mixup_alpha, generator)
