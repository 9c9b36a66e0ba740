"""Multi-label datasets end to end: a CheXpert-style manifest audited one finding at a time with a multi-label
model whose outputs are mapped to the findings explicitly (README, "Multi-label datasets")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from audit.data.decode import decode_image
from audit.data.demo import write_demo
from audit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from audit.store.catalog import query
from flows.cli import EXIT_ERROR, main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


class _ThreeFindings(nn.Module):
    """Output 0: brightness (Token), 1: noise, 2: darkness (Opacity); independent logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("multilabel")
    write_demo(root / "data", n=40, size=64, seed=5)
    rows = list(csv.DictReader((root / "data" / "manifest.csv").open()))
    values: dict[str, dict[str, str]] = {}
    with (root / "chexpert.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Patient ID", "Sex", "Opacity", "Token"])
        for i, row in enumerate(rows):
            # Token: uncertain (-1) for every fifth image and blank for every seventh: those are left out.
            token = "-1.0" if i % 5 == 0 else "" if i % 7 == 0 else str(float(i % 2))
            opacity = "1.0" if row["label"] == "opacity" else "0.0"
            writer.writerow([row["path"], f"p{i // 2}", "F", opacity, token])
            values[row["path"]] = {"Opacity": opacity, "Token": token}
    torch.manual_seed(0)
    model_path = root / "model.pt"
    torch.jit.save(torch.jit.script(_ThreeFindings().eval()), str(model_path))
    return root, root / "chexpert.csv", model_path, values


def _run(root: Path, manifest: Path, model: Path, out: Path, *extra: str) -> int:
    return main(
        ["run", "--no-prefect", "--quiet", "--data", str(root / "data"), "--manifest", str(manifest),
         "--model", str(model), "--multilabel", "--methods", "gradient", "--out", str(out), "--shard-size", "16",
         *extra]
    )  # fmt: skip


def test_each_finding_is_audited_on_its_own(dataset: tuple[Path, Path, Path, dict]) -> None:
    root, manifest, model, values = dataset
    out = root / "out"
    code = _run(root, manifest, model, out, "--findings", "Opacity,Token", "--outputs", "Token=0,Opacity=2")
    assert code == 0
    index = json.loads((out / "summary.json").read_text())
    assert [row["finding"] for row in index["findings"]] == ["Opacity", "Token"]
    assert {row["folder"] for row in index["findings"]} == {"Opacity", "Token"}
    page = (out / "index.html").read_text()
    assert 'href="Opacity/index.html"' in page and 'href="Token/index.html"' in page

    # Opacity: every image, labelled by its column; Token: only the images with a certain 0/1 value.
    _, opacity = query(out / "Opacity", "SELECT path, label, patient_id FROM images")
    assert len(opacity) == len(values)
    for path, label, patient in opacity:
        assert label == ("Opacity" if values[path]["Opacity"] == "1.0" else "no Opacity")
        assert patient is not None and patient.startswith("p")
    _, token = query(out / "Token", "SELECT path, label FROM images")
    certain = {p for p, v in values.items() if v["Token"] in ("0.0", "1.0")}
    assert {p for p, _ in token} == certain
    assert sum(index_row["images"] for index_row in index["findings"]) == len(values) + len(certain)


def test_each_finding_reads_its_own_output(dataset: tuple[Path, Path, Path, dict]) -> None:
    # The finding's probability is the sigmoid of the output it is mapped to (softmax over [z/2, -z/2] = sigmoid(z)):
    # computed here from the model directly, for two different mappings.
    root, manifest, model_path, _ = dataset
    model = torch.jit.load(str(model_path))
    spec = InputSpec(224, 3, IMAGENET_MEAN, IMAGENET_STD)  # what a TorchScript model gets (README, "Models")
    for index in (0, 2):
        out = root / f"out-{index}"
        assert _run(root, manifest, model_path, out, "--findings", "Opacity", "--outputs", f"Opacity={index}") == 0
        _, rows = query(
            out / "Opacity",
            "SELECT path, CASE WHEN label = 'Opacity' THEN label_probability ELSE 1 - label_probability END "
            "FROM images ORDER BY path LIMIT 8",
        )
        pixels = [spec.resize(decode_image((root / "data" / path).read_bytes())) for path, _ in rows]
        with torch.no_grad():
            logits = model(spec.normalise(torch.from_numpy(np.stack(pixels))))
        expected = torch.sigmoid(logits[:, index]).numpy()
        np.testing.assert_allclose([p for _, p in rows], expected, atol=1e-5)


def test_a_mapping_without_the_finding_is_refused(dataset: tuple[Path, Path, Path, dict], capsys) -> None:
    root, manifest, model, _ = dataset
    code = _run(root, manifest, model, root / "bad", "--findings", "Opacity", "--outputs", "Token=0")
    assert code == EXIT_ERROR
    assert "one finding at a time" in capsys.readouterr().err


def test_torchscript_with_a_layer_method_refused_before_any_image_is_read(
    dataset: tuple[Path, Path, Path, dict], capsys
) -> None:
    root, manifest, model, _ = dataset
    out = root / "cam"
    code = main(
        ["run", "--no-prefect", "--quiet", "--data", str(root / "data"), "--manifest", str(manifest),
         "--model", str(model), "--multilabel", "--findings", "Opacity", "--outputs", "Opacity=1",
         "--methods", "gradcam", "--out", str(out)]
    )  # fmt: skip
    assert code == EXIT_ERROR
    assert "takes no forward hooks, so gradcam" in capsys.readouterr().err
    assert not list(out.rglob("shard-*.npz"))
