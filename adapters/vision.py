"""Vision encoder adapters: CLIP and SigLIP vision towers (LLaVA-style feature selection).

``feature_layer`` indexes ``hidden_states`` as LLaVA does (-1 last, -2 penultimate); a list of
layers concatenates their features along the width, as transformers' Llava does with a list
``vision_feature_layer``. ``select: patch`` drops the CLS token (CLIP), ``all`` keeps it. Output:
(num_images, num_tokens, width x number of layers).
"""

from __future__ import annotations

import torch

from composer.adapters.encoder import HFEncoder, hidden_state_index

MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: past it, an image file is refused before it is decoded


# The image formats composer opens: raster formats only. PIL would also open EPS (handing the file to
# Ghostscript when it is installed) and other formats that run external programs or rarely-used decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(src):
    """``PIL.Image.open`` restricted to ``IMAGE_FORMATS``; another format is an ``UnidentifiedImageError``
    whose message names the allowed formats, not the file's bytes or temp path."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(src, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image") from None


def to_rgb(im):
    """A PIL image -> 8-bit RGB. 16- and 32-bit integer greyscale (16-bit PNGs open as ``I;16`` or
    ``I``) are scaled to 8 bits; ``convert("RGB")`` alone clips them, turning most pictures white."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        a = np.clip(a, 0, 65535) // 257  # 16-bit range -> 8 bits
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_images(processor, items: list) -> torch.Tensor:
    """Image files, PIL images or (3, H, W) tensors -> pixel_values (n, 3, H, W)."""
    from PIL import Image

    from composer.errors import InputError, first_line

    if all(isinstance(x, torch.Tensor) for x in items):
        return torch.stack(list(items))
    images = []
    for x in items:
        if isinstance(x, Image.Image):
            images.append(to_rgb(x))
            continue
        try:
            with open_image(x) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise InputError(f"{x}: image of {w} x {h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
                images.append(to_rgb(im))
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
            raise InputError(f"{x}: cannot read image ({type(e).__name__}: {first_line(e)})") from None
    return processor(images=images, return_tensors="pt")["pixel_values"]


class VisionEncoder(HFEncoder):
    """Wraps an HF ``*VisionModel``; attribute ``model`` keeps the HF keys below ``encoders.<m>.model``."""

    has_cls_token = True
    input_names = ("pixel_values",)

    def __init__(self, model, feature_layer: int | list[int] = -1, select: str = "patch"):
        super().__init__(model)
        n = model.config.num_hidden_layers
        self.feature_layers = tuple(feature_layer) if isinstance(feature_layer, (list, tuple)) else (feature_layer,)
        for i in self.feature_layers:  # the range check; hidden_states[i] as LLaVA indexes them
            hidden_state_index(i, n)
        self.feature_layer = feature_layer
        self.select = select

    @classmethod
    def _wrap(cls, hf, spec):
        return cls(hf, feature_layer=spec.feature_layer, select=spec.select)

    @classmethod
    def check_config(cls, config) -> None:
        if config.image_size < config.patch_size:  # not one patch: the patch convolution cannot run
            raise ValueError(
                f"config.image_size ({config.image_size}) must be at least config.patch_size ({config.patch_size})"
            )

    preprocess = staticmethod(load_images)

    @property
    def num_tokens(self) -> int:
        c = self.model.config
        patches = (c.image_size // c.patch_size) ** 2
        return patches + (1 if self.has_cls_token and self.select == "all" else 0)

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        s = self.model.config.image_size
        return {"pixel_values": torch.randn(n, self.model.config.num_channels, s, s)}

    @property
    def hidden_size(self) -> int:
        """The features' width: the model's, times the number of layers read side by side."""
        return self.model.config.hidden_size * len(self.feature_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, T, d_enc)
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        if self.has_cls_token and self.select == "patch":
            feats = feats[:, 1:]
        return feats


class ClipVisionEncoder(VisionEncoder):
    has_cls_token = True

    @staticmethod
    def hf_classes():
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessorPil

    @staticmethod
    def default_processor_kwargs(config) -> dict:
        s = config.image_size
        return {"size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s}}


class SiglipVisionEncoder(VisionEncoder):
    has_cls_token = False

    @staticmethod
    def hf_classes():
        from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessorPil

    @staticmethod
    def default_processor_kwargs(config) -> dict:
        s = config.image_size
        return {"size": {"height": s, "width": s}}
