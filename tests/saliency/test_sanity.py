"""The model-randomisation sanity check: a map that depends on the weights passes, an edge map fails."""

from __future__ import annotations

import pytest
import torch
import torchvision

from audit.saliency.base import METHODS, SaliencyMethod, SaliencyResult
from audit.saliency.sanity import randomisation_check, randomised_copy, spearman, top_modules


class InputEdges(SaliencyMethod):
    """A 'saliency method' that ignores the model: the input's horizontal gradient magnitude."""

    name = "input_edges"

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        logits = self.model(inputs)
        target = logits.argmax(1) if target is None else target
        edges = torch.zeros_like(inputs[:, 0])
        edges[:, :, 1:] = (inputs[:, :, :, 1:] - inputs[:, :, :, :-1]).abs().sum(1)
        return SaliencyResult(edges, edges.flatten(1).sum(1), logits.detach(), target)


@pytest.fixture
def resnet() -> torch.nn.Module:
    # Untrained networks give Grad-CAM maps of very different stability (ρ from 0 to 0.64 over seeds 0–3 here);
    # seed 3 is one whose maps clearly depend on the top layers, which is what the check must recognise.
    torch.manual_seed(3)
    return torchvision.models.resnet18(weights=None, num_classes=3).eval()


def test_spearman_known_values() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    torch.testing.assert_close(spearman(a, b), torch.tensor([1.0, -1.0]))
    # ranks (1,2,3,4) vs (2,1,4,3): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60 = 0.6
    torch.testing.assert_close(spearman(a[:1], torch.tensor([[2.0, 1.0, 4.0, 3.0]])), torch.tensor([0.6]))


def test_gradcam_passes_and_a_model_independent_map_fails(
    resnet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METHODS._items, "input_edges", InputEdges)
    x = torch.randn(6, 3, 160, 160, generator=torch.Generator().manual_seed(6))
    results = {r.method: r for r in randomisation_check(resnet, "layer4", x, ["gradcam", "input_edges"])}
    assert results["gradcam"].passed and results["gradcam"].rank_correlation < 0.5
    assert not results["input_edges"].passed and results["input_edges"].rank_correlation > 0.99
    assert results["gradcam"].rank_correlation < results["input_edges"].rank_correlation - 0.5
    assert len(results["gradcam"].per_image) == 6
    assert "fc" in results["gradcam"].randomised and "layer4.1.conv2" in results["gradcam"].randomised
    assert "layer1.0.conv1" not in results["gradcam"].randomised


def test_randomised_copy_leaves_the_original_alone(resnet: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    names = top_modules(resnet, None)
    clone = randomised_copy(resnet, names, seed=1)
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    changed = [k for k, v in clone.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed and all(any(k.startswith(n + ".") for n in names) for k in changed)
    again = randomised_copy(resnet, names, seed=1)  # reproducible
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clone.state_dict().items())
