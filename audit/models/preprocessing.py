"""Turning decoded images into model inputs: size, channels, mean and standard deviation.

The spec is taken from timm's pretrained configuration where the architecture has one (``input_size``,
``mean``, ``std``), so a user's timm checkpoint sees the statistics it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: ``channels`` × ``size`` × ``size`` floats, normalised by ``mean`` and ``std``."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def resize(self, image: np.ndarray) -> np.ndarray:
        """One decoded image ([H, W] or [H, W, 3] uint8) → uint8 [C, size, size].

        The image is stretched to a square (aspect ratio not kept), so region boxes scale by size/W and size/H.
        """
        interpolation = cv2.INTER_AREA if max(image.shape[:2]) > self.size else cv2.INTER_LINEAR
        resized = cv2.resize(image, (self.size, self.size), interpolation=interpolation)
        if self.channels == 1:
            if resized.ndim == 3:
                resized = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)
            return resized[None]
        if resized.ndim == 2:
            resized = np.repeat(resized[..., None], self.channels, axis=2)
        return np.ascontiguousarray(resized.transpose(2, 0, 1)[: self.channels])

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, S, S] on any device → float32 [B, C, S, S], normalised, on the same device."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
        return (batch.float() / 255.0 - mean) / std


def spec_from_timm(model: torch.nn.Module, size: int | None = None) -> InputSpec:
    """The input spec from timm's pretrained config of ``model`` (ImageNet statistics when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, _ = cfg.get("input_size", (3, 224, 224))
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != channels:  # a 1-channel model created from a 3-channel config
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return InputSpec(size=size or int(height), channels=int(channels), mean=mean, std=std)
