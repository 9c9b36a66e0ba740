"""Loading the user's model: a state dict for a timm or torchvision architecture, or a TorchScript file.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from audit.errors import ModelError
from audit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, InputSpec, spec_from_timm

TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class OutputMap:
    """Which model output is which dataset label.

    Attributes:
        indices: per dataset label (sorted label order), the model's output index; for a binary finding audit of a
            multi-label model the absent side is ``-(i + 1)`` for the finding's output i.
        num_outputs: the model's output count.
        multilabel: the outputs are independent sigmoid logits.
    """

    indices: tuple[int, ...]
    num_outputs: int
    multilabel: bool = False

    @property
    def identity(self) -> bool:
        return not self.multilabel and self.indices == tuple(range(self.num_outputs))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """float [B, num_outputs] → float [B, n_labels], the dataset's classes in label order.

        A multi-label finding's logit z becomes the pair [z/2, −z/2] (finding, absent): the softmax still gives
        sigmoid(z) to the finding, and the absent side has a gradient of its own (−½ ∂z), so images explained as
        "no finding" get a map rather than the zero map a constant logit would give.
        """
        if self.identity:
            return logits
        if self.multilabel:
            columns = [0.5 * logits[:, i] if i >= 0 else -0.5 * logits[:, -i - 1] for i in self.indices]
        else:
            columns = [logits[:, i] for i in self.indices]
        return torch.stack(columns, dim=1)


def resolve_outputs(
    labels: Sequence[str],
    mapping: Mapping[str, int] | None,
    num_outputs: int | None,
    multilabel: bool = False,
    finding: str | None = None,
) -> OutputMap:
    """Validate the user's label → output mapping against the dataset's labels.

    Without a mapping, the labels in sorted order are outputs 0, 1, ... (as torchvision's ImageFolder numbers
    class folders). A multi-label model needs a mapping that names the audited finding's output.

    Raises:
        ModelError: a dataset label without an output, an output mapped twice, an index out of range, a mapped
            label the dataset does not have, or a multi-label model without the finding's output.
    """
    labels = list(labels)
    if multilabel:
        if finding is None or mapping is None or finding not in mapping:
            raise ModelError(
                "a multi-label model is audited one finding at a time: pass --findings NAME and map the finding to "
                f"its output (--outputs '{finding or 'NAME'}=3'); found mapping {dict(mapping or {})}"
            )
        index = int(mapping[finding])
        total = num_outputs if num_outputs is not None else max(mapping.values()) + 1
        if not 0 <= index < total:
            raise ModelError(f"output index {index} of {finding!r} is outside the model's {total} outputs")
        return OutputMap(tuple(index if label == finding else -index - 1 for label in labels), total, True)
    if mapping is None:
        total = num_outputs if num_outputs is not None else len(labels)
        if total != len(labels):
            raise ModelError(
                f"the model has {total} outputs but the dataset {len(labels)} labels ({', '.join(labels)}); map "
                "each label to its output with --outputs 'label=index,...' (config: model.outputs)"
            )
        return OutputMap(tuple(range(len(labels))), total)
    unknown = sorted(set(mapping) - set(labels))
    missing = [label for label in labels if label not in mapping]
    if unknown or missing:
        raise ModelError(
            "model.outputs must map every label of the dataset, and only those: "
            + (f"missing {missing}; " if missing else "")
            + (f"not in the dataset {unknown}; " if unknown else "")
            + f"the dataset's labels are {labels}"
        )
    indices = tuple(int(mapping[label]) for label in labels)
    total = num_outputs if num_outputs is not None else max(indices) + 1
    if len(set(indices)) != len(indices):
        raise ModelError(f"model.outputs maps two labels to one output: {dict(mapping)}")
    if min(indices) < 0 or max(indices) >= total:
        raise ModelError(f"model.outputs {dict(mapping)}: indices must lie in 0..{total - 1} (the model's outputs)")
    return OutputMap(indices, total)


class _Selected(nn.Module):
    """A TorchScript model whose outputs are re-ordered by an :class:`OutputMap` (hooks do not work on it)."""

    def __init__(self, model: nn.Module, outputs: OutputMap) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs.select(self.model(x))


def is_scripted(model: nn.Module) -> bool:
    """Whether ``model`` is or contains TorchScript: it then takes no forward hooks and no per-layer re-init."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


def apply_outputs(model: nn.Module, outputs: OutputMap) -> nn.Module:
    """``model`` answering in the dataset's label order: a forward hook (module names unchanged, so target layers
    and the sanity check's layer names still apply), or a wrapper for TorchScript."""
    if outputs.identity:
        return model
    if isinstance(model, torch.jit.ScriptModule):
        return _Selected(model, outputs).eval()
    model.register_forward_hook(lambda _module, _inputs, output: outputs.select(output))
    return model


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


def model_output_count(path: Path, arch: str | None) -> int:
    """How many outputs the checkpoint has: a TorchScript model's output width on a blank input, or the rows of a
    state dict's last two-dimensional weight (its classifier, in the order ``state_dict()`` writes it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if _is_torchscript(path):
        model = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            return int(model(torch.zeros(1, 3, 224, 224)).shape[-1])
    state = _read_state_dict(path)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise ModelError(f"{path}: no classifier weight found; pass the output count with --num-outputs")
    return int(weights[-1].shape[0])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's parameter dict, read with ``weights_only=True`` (a pickle that would run code is refused)."""
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
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints


def load_user_model(path: Path, arch: str | None, num_classes: int | OutputMap) -> tuple[nn.Module, InputSpec]:
    """Load the user's checkpoint, in eval mode, with parameters frozen.

    Args:
        path: a state dict (``.pt``/``.pth``/``.bin`` saved with ``torch.save(model.state_dict())``, optionally
            wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``) or a TorchScript file (``torch.jit.save``).
        arch: the architecture name for a state dict; ignored for TorchScript.
        num_classes: the number of labels in the dataset (the model's outputs must match it), or an
            :class:`OutputMap` from :func:`resolve_outputs`: the model then answers in the dataset's label order.
    """
    outputs = num_classes if isinstance(num_classes, OutputMap) else None
    num_classes = outputs.num_outputs if outputs is not None else int(num_classes)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if _is_torchscript(path):
        model = torch.jit.load(str(path), map_location="cpu")
        spec = InputSpec(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        with torch.no_grad():
            found = model(torch.zeros(1, spec.channels, spec.size, spec.size)).shape[-1]
        if found != num_classes:
            raise ModelError(
                f"TorchScript model {path} has {found} outputs, but {num_classes} were expected (the dataset's "
                "classes, or model.num_outputs); map labels to outputs with --outputs"
            )
    else:
        if not arch:
            raise ModelError(f"{path} is a state dict: pass --arch NAME (a timm name or torchvision:<name>)")
        state = _read_state_dict(path)
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
    if outputs is not None:
        model = apply_outputs(model, outputs)
    return model, spec


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
