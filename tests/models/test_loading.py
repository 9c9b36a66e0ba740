"""Tests of loading a user's model: timm/torchvision state dicts, TorchScript, and refused pickles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from audit.errors import ModelError
from audit.models.loading import create_architecture, load_user_model, resolve_outputs

jit_warnings = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    # Non-default batch-norm statistics, so a load that drops buffers would change the outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _assert_same_outputs(loaded: nn.Module, original: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), original(example), rtol=0, atol=0)


def _assert_frozen_eval(model: nn.Module) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())
    parameters = list(model.parameters())
    assert parameters
    assert all(not p.requires_grad for p in parameters)


def test_timm_state_dict_round_trip(tmp_path: Path, resnet: nn.Module, example: torch.Tensor) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), path)
    model, spec = load_user_model(path, "resnet18", num_classes=2)
    _assert_same_outputs(model, resnet, example)
    _assert_frozen_eval(model)
    assert spec.channels == 3
    assert spec.size == 224
    assert len(spec.mean) == len(spec.std) == 3


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_wrapped_state_dict(tmp_path: Path, resnet: nn.Module, example: torch.Tensor, wrapper: str) -> None:
    path = tmp_path / "model.pth"
    torch.save({wrapper: resnet.state_dict(), "epoch": 3}, path)
    model, _ = load_user_model(path, "resnet18", num_classes=2)
    _assert_same_outputs(model, resnet, example)


def test_data_parallel_prefix(tmp_path: Path, resnet: nn.Module, example: torch.Tensor) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    model, _ = load_user_model(path, "resnet18", num_classes=2)
    _assert_same_outputs(model, resnet, example)


def test_wrong_num_classes(tmp_path: Path, resnet: nn.Module) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match=r"3 classes"):
        load_user_model(path, "resnet18", num_classes=3)


def test_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit architecture 'resnet18'"):
        load_user_model(path, "resnet18", num_classes=2)


def test_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelError, match=r"unknown architecture 'resnet18x_nope'.*torchvision:"):
        load_user_model(path, "resnet18x_nope", num_classes=2)


def test_unknown_torchvision_arch() -> None:
    with pytest.raises(ModelError, match="unknown torchvision architecture 'resnet_nope'"):
        create_architecture("torchvision:resnet_nope", 2)


def test_torchvision_arch(tmp_path: Path, example: torch.Tensor) -> None:
    model, spec = create_architecture("torchvision:resnet18", 2)
    assert model.fc.out_features == 2
    assert spec.size == 224 and spec.channels == 3
    model.eval()
    path = tmp_path / "tv.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = load_user_model(path, "torchvision:resnet18", num_classes=2)
    _assert_same_outputs(loaded, model, example)
    _assert_frozen_eval(loaded)


def test_state_dict_needs_arch(tmp_path: Path, resnet: nn.Module) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="--arch"):
        load_user_model(path, None, num_classes=2)


class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _helper() -> None:  # a function inside a checkpoint is pickled by reference
    pass


@pytest.mark.parametrize("kind", ["object", "function"])
def test_pickle_with_arbitrary_objects_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = _Payload(marker) if kind == "object" else {"weights": torch.zeros(2), "hook": _helper}
    torch.save(payload, path)
    with pytest.raises(ModelError, match=r"state_dict.*TorchScript|TorchScript.*state_dict"):
        load_user_model(path, "resnet18", num_classes=2)
    assert not marker.exists()


def test_non_tensor_values_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "note": "hello"}, path)
    with pytest.raises(ModelError, match="expected a state dict"):
        load_user_model(path, "resnet18", num_classes=2)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_user_model(tmp_path / "nope.pt", "resnet18", num_classes=2)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError):
        load_user_model(path, "resnet18", num_classes=2)


def _tiny_conv(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, outputs, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@jit_warnings
def test_torchscript_loads_without_arch(tmp_path: Path, example: torch.Tensor) -> None:
    original = _tiny_conv(2)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(original), str(path))
    model, spec = load_user_model(path, None, num_classes=2)
    assert isinstance(model, torch.jit.ScriptModule)
    _assert_same_outputs(model, original, example)
    _assert_frozen_eval(model)
    assert spec.channels == 3


@jit_warnings
def test_torchscript_wrong_num_classes(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_tiny_conv(5)), str(path))
    with pytest.raises(ModelError, match="classes"):
        load_user_model(path, None, num_classes=2)


def test_outputs_mapping_reorders_and_selects(tmp_path: Path, resnet: nn.Module, example: torch.Tensor) -> None:
    # A 5-output model whose outputs 3 and 1 are the dataset's "covid" and "normal".
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    path = tmp_path / "five.pt"
    torch.save(model.state_dict(), path)
    outputs = resolve_outputs(["covid", "normal"], {"normal": 1, "covid": 3}, num_outputs=5)
    loaded, _ = load_user_model(path, "resnet18", outputs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), model(example)[:, [3, 1]], rtol=0, atol=0)
    # Module names are unchanged (a hook, not a wrapper): target layers and the sanity check still find them.
    assert "layer4" in dict(loaded.named_modules())


@jit_warnings
def test_multilabel_finding_becomes_a_binary_softmax_equal_to_its_sigmoid(
    tmp_path: Path, example: torch.Tensor
) -> None:
    original = _tiny_conv(3)
    path = tmp_path / "multilabel.pt"
    torch.jit.save(torch.jit.script(original), str(path))
    labels = ("Effusion", "no Effusion")
    outputs = resolve_outputs(labels, {"Edema": 0, "Effusion": 2}, None, multilabel=True, finding="Effusion")
    assert outputs.indices == (2, -3) and outputs.num_outputs == 3
    loaded, _ = load_user_model(path, None, outputs)
    with torch.no_grad():
        probability = torch.softmax(loaded(example), dim=1)[:, labels.index("Effusion")]
        torch.testing.assert_close(probability, torch.sigmoid(original(example)[:, 2]))
    # The "no Effusion" side has a gradient of its own (−½ of the finding's), so its saliency maps are not empty.
    x = example.clone().requires_grad_(True)
    loaded(x)[:, labels.index("no Effusion")].sum().backward()
    finding = example.clone().requires_grad_(True)
    original(finding)[:, 2].sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, -0.5 * finding.grad)


@pytest.mark.parametrize(
    ("mapping", "num_outputs", "fragment"),
    [
        ({"covid": 0}, 2, r"missing \['normal'\]"),
        ({"covid": 0, "normal": 1, "flu": 2}, 3, r"not in the dataset \['flu'\]"),
        ({"covid": 0, "normal": 0}, 2, "two labels to one output"),
        ({"covid": 0, "normal": 7}, 4, r"0\.\.3"),
        (None, 4, "--outputs"),
    ],
)
def test_outputs_mapping_validated(mapping: dict | None, num_outputs: int, fragment: str) -> None:
    with pytest.raises(ModelError, match=fragment):
        resolve_outputs(["covid", "normal"], mapping, num_outputs)


def test_multilabel_needs_the_findings_output() -> None:
    with pytest.raises(ModelError, match="one finding at a time"):
        resolve_outputs(["Edema", "no Edema"], {"Effusion": 1}, 3, multilabel=True, finding="Edema")
