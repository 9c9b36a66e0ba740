"""The probe: a small CNN trained on the dataset itself, to learn what the dataset teaches.

DESIGN.md, "The probe model matters": a probe that cannot fire on a small patch anywhere in the image misses
exactly the cues the audit looks for. So: batch norm, max pooling (not strided convolutions and average
pooling), a global *max*-pooling head, enough resolution and enough epochs.

Cross-fitting: the images are split into K folds; the model of fold k is trained on the other folds, and each
image is predicted and explained by the model that did not see it in training. Held-out accuracy is then
honest, and a shortcut that is memorised per image (rather than learned) does not show up as attention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from audit.config import ProbeConfig
from audit.models.preprocessing import InputSpec

log = logging.getLogger(__name__)

PROBE_SPEC_MEAN = (0.5,)
PROBE_SPEC_STD = (0.25,)


def probe_input_spec(config: ProbeConfig) -> InputSpec:
    return InputSpec(size=config.image_size, channels=1, mean=PROBE_SPEC_MEAN, std=PROBE_SPEC_STD)


class ProbeNet(nn.Module):
    """conv-BN-ReLU-maxpool blocks, then global max pooling and a linear classifier.

    ``features`` ends with the last spatial map (stride 8): the Grad-CAM target layer.

    Args:
        num_classes: outputs of the classifier.
        width: channels of the first block; later blocks use 2×, 4×, 4×.
        in_chans: input channels.
    """

    def __init__(self, num_classes: int, width: int = 16, in_chans: int = 1) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        previous = in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(previous, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, C, H, W] → logits [B, num_classes]."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


@dataclass
class ProbeResult:
    """The K fold models and the fold of every training image."""

    models: list[ProbeNet]
    folds: np.ndarray  # int [N]: the fold whose model did NOT train on the image (it scores it)
    spec: InputSpec
    history: list[dict]


def assign_folds(image_ids: list[str], groups: list[str | None], k: int) -> np.ndarray:
    """Deterministic fold per image: by ``group`` when given (a patient or site never spans two folds), else by
    the image's content hash, so the assignment does not depend on file order."""
    keys = [g if g else i for i, g in zip(image_ids, groups, strict=True)]
    return np.array([int(key_hash(key), 16) % k for key in keys], dtype=np.int64)


def key_hash(key: str) -> str:
    import hashlib

    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def train_probe(
    inputs: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    num_classes: int,
    config: ProbeConfig,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Train one probe per fold.

    Args:
        inputs: uint8 [N, 1, S, S], already resized to ``config.image_size``.
        labels: int [N] class indices.
        folds: int [N] in [0, K): the model of fold k trains on every image whose fold is not k.
        num_classes: number of classes.
        config: probe hyper-parameters.
        device: where to train.
        progress: called with a line of text after each epoch (the flow logs it).
    """
    spec = probe_input_spec(config)
    models: list[ProbeNet] = []
    history: list[dict] = []
    x_all = torch.from_numpy(inputs)
    y_all = torch.from_numpy(labels.astype(np.int64))
    for fold in range(config.folds):
        train_idx = np.flatnonzero(folds != fold)
        torch.manual_seed(config.seed * 1000 + fold)
        model = ProbeNet(num_classes, width=config.width).to(device)
        # Class weights: a probe on an unbalanced dataset should not learn the prior alone.
        counts = np.bincount(labels[train_idx], minlength=num_classes).astype(np.float64)
        weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / num_classes, dtype=torch.float32, device=device)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
        steps_per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
        )
        generator = torch.Generator().manual_seed(config.seed * 1000 + fold)
        model.train()
        for epoch in range(config.epochs):
            order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]
            total, correct, loss_sum = 0, 0, 0.0
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                if len(idx) < 2:  # batch norm needs more than one sample
                    continue
                x = spec.normalise(_augment(x_all[idx].to(device, non_blocking=True), generator))
                y = y_all[idx].to(device, non_blocking=True)
                logits = model(x)
                loss = loss_fn(logits, y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                total += len(idx)
            record = {
                "fold": fold,
                "epoch": epoch + 1,
                "loss": loss_sum / max(total, 1),
                "train_accuracy": correct / max(total, 1),
            }
            history.append(record)
            if progress is not None:
                progress(
                    f"probe fold {fold + 1}/{config.folds} epoch {epoch + 1}/{config.epochs}: "
                    f"loss {record['loss']:.3f}, train accuracy {record['train_accuracy']:.3f}"
                )
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
    return ProbeResult(models=models, folds=folds, spec=spec, history=history)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and small shifts of a batch uint8 [B, C, S, S] (one shift per batch, by up to 1/16
    of the side, filled by replication at the edges).

    Without them the probe memorises its few hundred training images (training accuracy 1.0 with held-out
    accuracy at chance on the balanced demo) instead of learning the content; with them it learns what generalises,
    the real signal and any shortcut that recurs, which is what the audit must see.
    """
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    limit = max(1, x.shape[-1] // 16)
    dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
    padded = torch.nn.functional.pad(x.float(), (limit, limit, limit, limit), mode="replicate")
    size_y, size_x = x.shape[-2:]
    return padded[..., limit + dy : limit + dy + size_y, limit + dx : limit + dx + size_x].to(x.dtype)


def save_probe(result: ProbeResult, path: str) -> None:
    """Save the fold models' state dicts (loadable with ``torch.load(..., weights_only=True)``)."""
    torch.save({f"fold{k}": m.state_dict() for k, m in enumerate(result.models)}, path)
