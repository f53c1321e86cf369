from __future__ import annotations

import pytest
from pydantic import ValidationError

from models_registry.errors import InvalidName
from models_registry.manifest import AliasEvent, Manifest, ModelRef, check_alias, check_name
from tests.models_registry.conftest import ManifestFactory

BAD_NAMES = ["", "..", "../x", "a/b", "a\\b", ".hidden", "Upper", "a..b", "a b", "x\n", "a" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)
    with pytest.raises(ValidationError):
        ModelRef(name=name, version=1)


@pytest.mark.parametrize("name", ["a", "patchtst-etth1-96", "m.v2_x", "0" * 64])
def test_good_names_pass(name: str) -> None:
    assert check_name(name) == name


def test_aliases_cannot_be_all_digits() -> None:
    assert check_alias("staging") == "staging"
    with pytest.raises(InvalidName):
        check_alias("3")


def test_manifest_defaults_and_validation(make_manifest: ManifestFactory) -> None:
    m = make_manifest(channels=7, teachers=["patchtst-etth1@2"])
    assert m.version == 0 and m.sha256 is None
    assert m.input_shape == ["batch", 8, 7]
    assert m.output_shape == ["batch", 4, 7]
    assert m.teachers == [ModelRef(name="patchtst-etth1", version=2)]
    assert make_manifest().input_shape == ["batch", 8, "channels"]
    assert Manifest.model_validate_json(m.model_dump_json()) == m

    with pytest.raises(ValidationError):
        make_manifest(kind="ensemble")  # no members
    with pytest.raises(ValidationError):
        make_manifest(members=[{"name": "a", "version": 1}])  # members on a student
    with pytest.raises(ValidationError):
        make_manifest(unknown_field=1)  # typos fail loudly
    with pytest.raises(ValidationError):
        make_manifest(output_shape=["batch", 5, "channels"])


def test_calibration_is_checked_against_horizon(make_manifest: ManifestFactory) -> None:
    cal = {"n": 100, "levels": [50, 90], "quantiles": [[0.5] * 4, [1.5] * 4]}
    assert make_manifest(calibration=cal).calibration is not None
    with pytest.raises(ValidationError):
        make_manifest(calibration={**cal, "quantiles": [[0.5] * 3, [1.5] * 3]})
    with pytest.raises(ValidationError):  # intervals would cross
        make_manifest(calibration={**cal, "quantiles": [[1.5] * 4, [0.5] * 4]})


def test_model_ref_and_alias_event() -> None:
    assert str(ModelRef.parse("student-x@12")) == "student-x@12"
    with pytest.raises(InvalidName):
        ModelRef.parse("student-x@prod")
    event = AliasEvent(name="a", alias="production", version=2, previous=1)
    assert AliasEvent.model_validate_json(event.model_dump_json()) == event


def test_lineage_is_optional_and_checked(make_manifest: ManifestFactory) -> None:
    old = make_manifest()
    legacy = old.model_dump(mode="json")
    del legacy["lineage"]  # a manifest written before lineage was recorded
    assert Manifest.model_validate(legacy).lineage is None
    lineage = {"git_commit": "a" * 40, "git_dirty": False, "seed": 0, "data_file": "ETTh1.csv",
               "data_sha256": "b" * 64, "run_dir": "runs/x/mlp", "train": {"seed": 0}}
    m = make_manifest(lineage=lineage)
    assert m.lineage is not None and m.lineage.seed == 0 and m.lineage.distill == {}
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    with pytest.raises(ValidationError):
        make_manifest(lineage={**lineage, "data_sha256": "not-a-digest"})
    with pytest.raises(ValidationError):
        make_manifest(lineage={**lineage, "git_comit": "a" * 40})  # typos fail loudly
