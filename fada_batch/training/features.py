"""Frozen image features (vision tower -> Q-Former -> language_projection), computed once.

Only the language model's LoRA trains, so these features are the same for all eight
questions of an image and every epoch; the seed ran the vision tower and Q-Former again for
each of them. Training, evaluation and the bench all take their features from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fada_batch.training.model import LoadedModel, base_of, image_features


def pixel_values_for(
    processor: Any, paths: list[Path], *, device: torch.device, dtype: torch.dtype, max_pixels: int
) -> torch.Tensor:
    """(B, 3, H, W) pixel values of the images at `paths`, via the model's image processor."""
    from fada_batch.data.images import load_image_rgb

    images = [load_image_rgb(p, max_pixels=max_pixels) for p in paths]
    pv = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pv.to(device=device, dtype=dtype)


class FeatureSource:
    """Frozen image features by image name: computed once and kept (cache on) or per batch.

    Both modes go through the same `image_features` call in eval mode, so cached and
    uncached training see identical inputs; the cache only removes repeated work (the vision
    tower and Q-Former ran for every question of every image in every epoch in the seed).
    """

    def __init__(
        self, loaded: LoadedModel, image_paths: dict[str, Path], *, cache: bool, max_pixels: int
    ) -> None:
        self.loaded = loaded
        self.paths = image_paths
        self.cache_on = cache
        self.max_pixels = max_pixels
        self.cache: dict[str, torch.Tensor] = {}
        self.vision_dtype = base_of(loaded.model).vision_model.embeddings.patch_embedding.weight.dtype

    def _compute(self, names: list[str]) -> torch.Tensor:
        pv = pixel_values_for(
            self.loaded.processor,
            [self.paths[n] for n in names],
            device=self.loaded.device,
            dtype=self.vision_dtype,
            max_pixels=self.max_pixels,
        )
        return image_features(self.loaded.model, pv)  # (B, Q, H)

    def warm(self, names: list[str], batch: int = 16) -> None:
        """Fill the cache for `names` (no-op when the cache is off)."""
        if not self.cache_on:
            return
        todo = [n for n in dict.fromkeys(names) if n not in self.cache]
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            feats = self._compute(chunk)
            for n, f in zip(chunk, feats, strict=True):
                self.cache[n] = f

    def get(self, names: list[str]) -> torch.Tensor:
        """(B, Q, H) features for the images of a batch (rows in `names` order)."""
        if not self.cache_on:
            uniq = list(dict.fromkeys(names))
            feats = dict(zip(uniq, self._compute(uniq), strict=True))
            return torch.stack([feats[n] for n in names])
        self.warm(names)
        return torch.stack([self.cache[n] for n in names])
