"""Tests of the generic plugin registry."""

from __future__ import annotations

import pytest

from audit.errors import AuditError, UnknownNameError
from audit.registry import Registry


@pytest.fixture
def registry() -> Registry[object]:
    reg: Registry[object] = Registry("saliency method")

    @reg.register("gradcam")
    def gradcam() -> str:
        return "gradcam"

    reg.register("gradcampp")(lambda: "gradcampp")
    reg.register("integrated_gradients")(lambda: "ig")
    return reg


def test_register_returns_the_object_and_get_finds_it(registry: Registry[object]) -> None:
    def scorecam() -> str:
        return "scorecam"

    assert registry.register("scorecam")(scorecam) is scorecam
    assert registry.get("scorecam") is scorecam
    assert registry.get("gradcam")() == "gradcam"


def test_names_sorted_and_filtered_by_pattern(registry: Registry[object]) -> None:
    assert registry.names() == ["gradcam", "gradcampp", "integrated_gradients"]
    assert registry.names("gradcam*") == ["gradcam", "gradcampp"]
    assert registry.names("*grad*") == ["gradcam", "gradcampp", "integrated_gradients"]
    assert registry.names("GRADCAM") == []  # case-sensitive
    assert registry.names("nothing*") == []


def test_container_protocol(registry: Registry[object]) -> None:
    assert "gradcam" in registry
    assert "scorecam" not in registry
    assert len(registry) == 3
    assert list(registry) == registry.names()


def test_duplicate_name_raises_and_keeps_the_first(registry: Registry[object]) -> None:
    first = registry.get("gradcam")
    with pytest.raises(AuditError, match="'gradcam' is already registered"):
        registry.register("gradcam")(lambda: "other")
    assert registry.get("gradcam") is first


def test_unknown_name_lists_valid_names(registry: Registry[object]) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.get("gradkam")
    message = str(info.value)
    assert message == "unknown saliency method 'gradkam'; valid names: gradcam, gradcampp, integrated_gradients"
    assert not message.startswith(('"', "'"))  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, AuditError)


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(UnknownNameError, match=r"valid names: \(none\)"):
        Registry[object]("region detector").get("text")


def test_registries_are_independent(registry: Registry[object]) -> None:
    other: Registry[object] = Registry("region detector")
    other.register("gradcam")(object())  # same name, other family: allowed
    assert len(other) == 1
    assert len(registry) == 3
