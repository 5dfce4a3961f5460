"""Image transforms whose randomness comes only from an explicit `torch.Generator`.

The collators seed one generator per (seed, epoch, example) and pass it here and then to the mask
generator, so an example's crop, flip and mask are a pure function of those three numbers.

Speed (the pretraining input pipeline is what bounds MIM on accelerators): `MaskedImageTransform`
crops and resizes on the decoded image's uint8 pixels with torch's antialiased uint8 kernels (about
4x faster than Pillow's resize here, and within 1 intensity level of it, the same filter), and leaves
ToTensor + Normalize to one vectorised call per batch (`normalize`), bitwise what torchvision computes
per image, which the collators leave to the accelerator (`hf_mim.data.batch_to_device`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _interpolation(name: str | InterpolationMode) -> InterpolationMode:
    return name if isinstance(name, InterpolationMode) else InterpolationMode(str(name).lower())


def uint8_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image, as a channels-last view (what torch's fast uint8
    resize kernels take)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width): torchvision's `RandomResizedCrop.get_params`, op for op
    (10 attempts of area ~ U(scale) x image area and log-uniform aspect ratio, else a central crop
    clamped to `ratio`), with every draw taken from `generator`. With `generator=None` it consumes
    torch's global RNG exactly as torchvision does (the tests check equality)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item())
            return top, left, crop_height, crop_width
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class MaskedImageTransform:
    """RandomResizedCrop + random horizontal flip + ToTensor + Normalize, driven by a passed generator.

    `__call__(image, generator)` -> float32 tensor (3, H, W). Draw order from the generator: crop
    parameters, then (if `hflip`) one uniform for the flip. Also the train transform for fine-tuning
    (pass e.g. `scale=(0.08, 1.0)`). Collators call `crop_flip` per image and `normalize` per batch
    (`uint8_batches`).
    """

    uint8_batches = True  # the collators may call crop_flip per image and normalize once per batch

    def __init__(
        self,
        image_size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str | InterpolationMode = "bicubic",
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.size = _pair(image_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.mean = list(mean)
        self.std = list(std)
        self.interpolation = _interpolation(interpolation)

    def get_params(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        width, height = image.size
        return random_resized_crop_params(height, width, self.scale, self.ratio, generator)

    @property
    def min_decode_side(self) -> int:
        """Shorter image side that still gives every crop this transform can draw at least the output's
        pixels: a crop covers >= scale[0] of the area at an aspect within `ratio`, so its shorter side
        is >= sqrt(scale[0] * min(ratio[0], 1 / ratio[1])) x the image's shorter side. Decoding larger
        JPEGs at reduced scale down to this side (prepare_stream's `decode_min_side`) never makes the
        resize upsample."""
        return math.ceil(max(self.size) / math.sqrt(self.scale[0] * min(self.ratio[0], 1 / self.ratio[1])))

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.transform_with_params(image, generator)[0]

    def crop_flip(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(uint8 (3, H, W) pixels, crop box, flipped): the random resized crop and flip, before ToTensor
        and Normalize (`normalize`, batched by the collators). The crop box is (top, left, height,
        width) as fractions of the image, so per-image data computed on the whole image (AMT's
        attention maps) can follow the crop."""
        top, left, height, width = self.get_params(image, generator)
        image_width, image_height = image.size
        crop_box = torch.tensor(
            [top / image_height, left / image_width, height / image_height, width / image_width], dtype=torch.float64
        )
        if self.interpolation in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
            crop = uint8_pixels(image.crop((left, top, left + width, top + height)))  # copies the crop only
            pixels = torch.nn.functional.interpolate(
                crop[None], size=self.size, mode=self.interpolation.value, antialias=True, align_corners=False
            )[0]
        else:  # other filters: Pillow's, as torchvision applies them to PIL images
            resized = F.resized_crop(image, top, left, height, width, list(self.size), self.interpolation, antialias=True)
            pixels = uint8_pixels(resized)
        flipped = bool(self.hflip and torch.rand(1, generator=generator).item() < 0.5)
        if flipped:
            pixels = pixels.flip(-1)
        return pixels, crop_box, flipped

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 ToTensor (/255) + Normalize, the same float operations as
        torchvision's `to_tensor` + `normalize` (bitwise equal), on a whole batch at once, on the
        pixels' device (IEEE-rounded elementwise ops: the same bits on an accelerator)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)

    def transform_with_params(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(float32 tensor, crop box, flipped): `crop_flip` then `normalize`."""
        pixels, crop_box, flipped = self.crop_flip(image, generator)
        return self.normalize(pixels), crop_box, flipped

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"interpolation={self.interpolation.value})"
        )


class TwoViewTransform(MaskedImageTransform):
    """Two views of one image: ONE random resized crop + flip shared by both ("shared crop"), then an
    independent colour jitter (p `jitter_prob`, brightness/contrast/saturation/hue in random order as
    torchvision's ColorJitter) and random grayscale per view ("different colours") — ExtreMA's recipe.
    `shared_crop=False` gives each view a crop + flip of its own (BYOL's spatial augmentation).

    `__call__(image, generator)` -> (view_1, view_2), each (3, H, W). Every draw comes from `generator`.
    """

    uint8_batches = False  # two colour-jittered views per image, on PIL images: __call__ only

    def __init__(
        self,
        image_size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        shared_crop: bool = True,
        **kwargs,
    ):
        super().__init__(image_size, scale=scale, **kwargs)
        self.shared_crop = shared_crop
        self.color_jitter = tuple(color_jitter)
        self.jitter_prob = jitter_prob
        self.grayscale_prob = grayscale_prob

    def _uniform(self, low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    def _colour(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        brightness, contrast, saturation, hue = self.color_jitter
        if torch.rand(1, generator=generator).item() < self.jitter_prob:
            adjust = {
                0: lambda im: F.adjust_brightness(im, self._uniform(max(0.0, 1 - brightness), 1 + brightness, generator)),
                1: lambda im: F.adjust_contrast(im, self._uniform(max(0.0, 1 - contrast), 1 + contrast, generator)),
                2: lambda im: F.adjust_saturation(im, self._uniform(max(0.0, 1 - saturation), 1 + saturation, generator)),
                3: lambda im: F.adjust_hue(im, self._uniform(-hue, hue, generator)),
            }
            for index in torch.randperm(4, generator=generator).tolist():
                image = adjust[index](image)
        if torch.rand(1, generator=generator).item() < self.grayscale_prob:
            image = F.to_grayscale(image, num_output_channels=3)
        return image

    def _crop_flip(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        top, left, height, width = self.get_params(image, generator)
        image = F.resized_crop(image, top, left, height, width, list(self.size), self.interpolation, antialias=True)
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            image = F.hflip(image)
        return image

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._crop_flip(image, generator) if self.shared_crop else None
        views = []
        for _ in range(2):
            view = shared if self.shared_crop else self._crop_flip(image, generator)
            views.append(F.normalize(F.to_tensor(self._colour(view, generator)), self.mean, self.std))
        return tuple(views)


def eval_resize_size(image_size: int | Sequence[int], crop_pct: float) -> int:
    """The short side before the centre crop, int(image_size / crop_pct) as MAE/BEiT evaluate; shared
    with the saved image processor so that inference preprocesses as evaluation does."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(min(_pair(image_size)) / crop_pct))


class EvalTransform:
    """Resize the shorter side to int(image_size / crop_pct) (bicubic), center-crop, ToTensor, Normalize.

    Deterministic; `__call__(image, generator=None)` accepts and ignores a generator so it can be used
    wherever a train transform can.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str | InterpolationMode = "bicubic",
    ):
        self.size = _pair(image_size)
        self.crop_pct = crop_pct
        self.resize_size = eval_resize_size(image_size, crop_pct)
        self.mean = list(mean)
        self.std = list(std)
        self.interpolation = _interpolation(interpolation)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = F.resize(image, self.resize_size, self.interpolation, antialias=True)
        image = F.center_crop(image, list(self.size))
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation.value})"


class ResizeTransform:
    """The whole image resized to image_size x image_size (aspect not kept), ToTensor, Normalize.

    Deterministic. AMT's attention pass reads every image this way (official `Resize((224, 224))`), so
    a training crop box, given as fractions of the image, points at the same part of the map.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str | InterpolationMode = "bilinear",
    ):
        self.size = _pair(image_size)
        self.mean = list(mean)
        self.std = list(std)
        self.interpolation = _interpolation(interpolation)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = F.resize(image, list(self.size), self.interpolation, antialias=True)
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"
