"""Loading the user's model: a state dict for a timm or torchvision architecture, or a TorchScript file.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from audit.errors import ModelError
from audit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, InputSpec, spec_from_timm

TORCHVISION_PREFIX = "torchvision:"


def create_architecture(arch: str, num_classes: int) -> tuple[nn.Module, InputSpec]:
    """An untrained model of ``arch`` with ``num_classes`` outputs, and its input spec. Never downloads weights.

    ``arch`` is a timm name (``resnet18``, ``convnext_tiny``, ...) or ``torchvision:<name>``.
    """
    import timm

    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX) :]
        if name not in torchvision.models.list_models():
            raise ModelError(f"unknown torchvision architecture {name!r}; see torchvision.models.list_models()")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return model, InputSpec(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        raise ModelError(
            f"unknown architecture {arch!r}: not a timm model name (close ones: {', '.join(close) or 'none'}); "
            f"use '{TORCHVISION_PREFIX}<name>' for a torchvision architecture"
        )
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return model, spec_from_timm(model)


def load_user_model(path: Path, arch: str | None, num_classes: int) -> tuple[nn.Module, InputSpec]:
    """Load the user's checkpoint, in eval mode, with parameters frozen.

    Args:
        path: a state dict (``.pt``/``.pth``/``.bin`` saved with ``torch.save(model.state_dict())``, optionally
            wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``) or a TorchScript file (``torch.jit.save``).
        arch: the architecture name for a state dict; ignored for TorchScript.
        num_classes: the number of labels in the dataset; the model's outputs must match it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if _is_torchscript(path):
        model = torch.jit.load(str(path), map_location="cpu")
        spec = InputSpec(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        with torch.no_grad():
            outputs = model(torch.zeros(1, spec.channels, spec.size, spec.size)).shape[-1]
        if outputs != num_classes:
            raise ModelError(
                f"TorchScript model {path} has {outputs} outputs, but the dataset has {num_classes} classes"
            )
    else:
        if not arch:
            raise ModelError(f"{path} is a state dict: pass --arch NAME (a timm name or torchvision:<name>)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"{path} is not a plain state dict (refused to unpickle arbitrary objects: "
                f"{str(exc).splitlines()[0]}); "
                "save it with torch.save(model.state_dict(), path), or export TorchScript with torch.jit.save"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{path} could not be read as a PyTorch checkpoint: {exc}") from None
        if isinstance(state, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ModelError(f"{path}: expected a state dict (parameter name → tensor)")
        state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints
        model, spec = create_architecture(arch, num_classes)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = "; ".join(str(exc).splitlines()[:4])
            raise ModelError(
                f"{path} does not fit architecture {arch!r} with {num_classes} classes (the dataset's label count): "
                f"{first}"
            ) from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, spec


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
