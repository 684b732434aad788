"""Multi-label Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a training batch on its device, in timm's
batch mode, drawn from (seed, epoch, step) alone so that a resumed run mixes as an uninterrupted one
(docs/method.md#mixup-and-cutmix)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from udtimm.settings import MixingSettings

# The first word of every mixing seed: keeps these draws apart from the other streams seeded from the run's seed
# (the loader's per-image SeedSequence([seed + epoch, index]) among them).
_STREAM = 0x6D6978  # "mix"


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: image i with image B-1-i (the batch flipped, timm's batch mode), weight `lam` on its own.

    `box` (top, bottom, left, right) is the region CutMix pastes from the partner; None is Mixup. An odd batch's
    middle image is its own partner, and stays as it is.
    """

    lam: float
    box: tuple[int, int, int, int] | None = None

    def images(self, images: Tensor) -> Tensor:
        """Mixup: lam x_i + (1 - lam) x_j (Zhang et al. 2018); CutMix: x_j's pixels in x_i's box (Yun et al. 2019)."""
        partner = images.flip(0)
        if self.box is None:
            return torch.lerp(partner, images, self.lam)
        top, bottom, left, right = self.box
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        return mixed

    def labels(self, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The soft targets lam y_i + (1 - lam) y_j of the (target, mask) that the label policies made of each image,
        and the pairs that count in both images (docs/method.md#mixup-and-cutmix)."""
        # lerp leaves a label the two images share exactly as it is (1 stays 1, 0 stays 0).
        return torch.lerp(target.flip(0), target, self.lam), mask & mask.flip(0)

    def in_either(self, flags: Tensor) -> Tensor:
        """Per (image, class) pair: whether `flags` holds in either of the two images mixed there."""
        return flags | flags.flip(0)


def cutmix_box(lam: float, size: tuple[int, int], centre: tuple[int, int]) -> Mix:
    """CutMix's box (timm's rand_bbox): sides sqrt(1 - lam) of the image's around `centre` (row, column), clipped at
    the border, with lam corrected to the area actually cut (timm's correct_lam)."""
    height, width = size
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    row, column = centre
    top, bottom = max(row - cut_h // 2, 0), min(row + (cut_h + 1) // 2, height)
    left, right = max(column - cut_w // 2, 0), min(column + (cut_w + 1) // 2, width)
    return Mix(1 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))


class Mixer:
    """Each training batch's Mix, drawn as timm's Mixup draws it in batch mode: whether to mix (--mixup-prob), CutMix
    or Mixup (--mixup-switch-prob when both are on), lam ~ Beta(alpha, alpha), CutMix's centre.

    The draws come from a generator of their own seeded by (seed, epoch, step), never from a global one: a resumed
    epoch mixes its batches as the uninterrupted run did, and the other augmentations' streams do not move. Every
    process draws the same Mix for a step and mixes its own batch with it.
    """

    def __init__(self, settings: MixingSettings, seed: int) -> None:
        self.settings, self.seed = settings, seed

    def draw(self, epoch: int, step: int, size: tuple[int, int]) -> Mix | None:
        """The Mix of batch `step` of `epoch` for images of `size` (height, width); None leaves the batch as it is."""
        settings = self.settings
        if settings.mixup == settings.cutmix == 0 or 0 < settings.mixup_off_epoch <= epoch:
            return None
        # NumPy's generator: torch draws Beta samples from its global generator only.
        rng = np.random.default_rng(np.random.SeedSequence([_STREAM, self.seed % 2**64, epoch, step]))
        if rng.random() >= settings.mixup_prob:
            return None
        use_cutmix = settings.cutmix > 0 and (settings.mixup == 0 or rng.random() < settings.mixup_switch_prob)
        alpha = settings.cutmix if use_cutmix else settings.mixup
        lam = float(rng.beta(alpha, alpha))
        mix = cutmix_box(lam, size, (int(rng.integers(size[0])), int(rng.integers(size[1])))) if use_cutmix \
            else Mix(lam)
        # lam = 1 (an empty box) mixes nothing: the labels must stay as they are too.
        return None if mix.lam == 1 else mix
