"""The bundle manifest: checksums of every file, and what verify_bundle reports as a problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from apps.models.bundle import (
    MANIFEST_NAME,
    BundleError,
    manifest_sha256,
    read_manifest,
    verify_bundle,
    write_manifest,
)

FEATURES = [{"name": "item_pop", "dtype": "float64"}, {"name": "user_age_days", "dtype": "int64"}]


def make_bundle(directory: Path) -> Path:
    """A tiny bundle: a ranker text model in a sub-folder and a recall artefact."""
    (directory / "ranker").mkdir(parents=True)
    (directory / "ranker" / "model.txt").write_text("tree\nnum_leaves=31\n", encoding="utf-8")
    (directory / "recall_itemcf.npz").write_bytes(b"\x93NUMPY fake array bytes")
    write_manifest(
        directory,
        version="v1",
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={"interactions": "snap-7"},
        features=FEATURES,
        params={"num_leaves": 31},
        metrics={"ndcg@10": 0.31},
    )
    return directory


def test_the_manifest_records_the_sha256_of_every_file_except_itself(tmp_path):
    # Given a bundle with a nested file
    bundle = make_bundle(tmp_path / "b")
    # When the manifest is read back
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    # Then it lists both files (recursively, POSIX paths) with their real checksums
    expected = hashlib.sha256(b"\x93NUMPY fake array bytes").hexdigest()
    assert set(manifest["files"]) == {"ranker/model.txt", "recall_itemcf.npz"}
    assert manifest["files"]["recall_itemcf.npz"] == expected
    # and the metadata the architecture asks for
    assert manifest["version"] == "v1"
    assert manifest["features"] == FEATURES
    assert manifest["data_snapshot"] == {"interactions": "snap-7"}
    assert read_manifest(bundle) == manifest


def test_a_fresh_bundle_verifies_without_problems(tmp_path):
    assert verify_bundle(make_bundle(tmp_path / "b")) == []


def test_a_single_modified_byte_is_a_checksum_mismatch(tmp_path):
    # Given a valid bundle
    bundle = make_bundle(tmp_path / "b")
    # When one byte of the ranker changes
    path = bundle / "ranker" / "model.txt"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    # Then verification names that file
    assert verify_bundle(bundle) == ["checksum mismatch: ranker/model.txt"]


def test_an_added_pickle_file_is_reported_as_forbidden_and_unlisted(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (bundle / "ranker" / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    problems = verify_bundle(bundle)
    assert "pickle file not allowed: ranker/model.pkl" in problems
    assert "extra file not in manifest: ranker/model.pkl" in problems


def test_a_pickle_listed_in_the_manifest_is_still_forbidden(tmp_path):
    # Given a manifest that lists a pickle with its correct checksum
    bundle = make_bundle(tmp_path / "b")
    (bundle / "scaler.pickle").write_bytes(b"\x80\x04K\x01.")
    manifest = read_manifest(bundle)
    manifest["files"]["scaler.pickle"] = hashlib.sha256(b"\x80\x04K\x01.").hexdigest()
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    # Then it is a problem even though the checksum matches
    assert verify_bundle(bundle) == ["pickle file not allowed: scaler.pickle"]


def test_writing_a_manifest_over_a_pickle_file_is_refused(tmp_path):
    directory = tmp_path / "b"
    directory.mkdir()
    (directory / "model.joblib").write_bytes(b"x")
    with pytest.raises(
        BundleError, match=r"pickle files are not allowed in a bundle: model\.joblib"
    ):
        write_manifest(
            directory,
            version="v1",
            created_at="2024-05-01",
            data_snapshot={},
            features=[],
            params={},
            metrics={},
        )
    assert not (directory / MANIFEST_NAME).exists()


def test_a_missing_file_and_an_extra_file_are_both_reported(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (bundle / "recall_itemcf.npz").unlink()
    (bundle / "notes.txt").write_text("added later")
    assert verify_bundle(bundle) == [
        "missing file: recall_itemcf.npz",
        "extra file not in manifest: notes.txt",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "manifest.json is unreadable"),
        ("[1, 2]", "manifest.json is unreadable: manifest.json is not a JSON object"),
        ('{"version": "v1"}', 'manifest.json is unreadable: manifest.json has no "files"'),
    ],
)
def test_an_unreadable_manifest_is_one_problem(tmp_path, content, expected):
    bundle = make_bundle(tmp_path / "b")
    (bundle / MANIFEST_NAME).write_text(content)
    problems = verify_bundle(bundle)
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_a_missing_manifest_or_directory_is_reported(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (bundle / MANIFEST_NAME).unlink()
    assert verify_bundle(bundle) == ["manifest.json is missing"]
    assert verify_bundle(tmp_path / "nowhere") == [
        f"bundle directory {tmp_path / 'nowhere'} does not exist"
    ]


def test_a_manifest_path_escaping_the_bundle_is_unsafe(tmp_path):
    # Given a manifest that points outside its directory at a real file
    bundle = make_bundle(tmp_path / "b")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    manifest = read_manifest(bundle)
    manifest["files"]["../secret.txt"] = hashlib.sha256(b"x").hexdigest()
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    # Then it is reported, not followed
    assert verify_bundle(bundle) == ["unsafe path in manifest: ../secret.txt"]


def test_a_symlink_inside_the_bundle_is_reported(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (tmp_path / "elsewhere.txt").write_text("x")
    (bundle / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    assert verify_bundle(bundle) == ["symlink not allowed: link.txt"]


def test_the_manifest_fingerprint_changes_when_the_manifest_is_rewritten(tmp_path):
    # Given a bundle's manifest fingerprint
    bundle = make_bundle(tmp_path / "b")
    before = manifest_sha256(bundle)
    # When a file changes and the manifest is regenerated (so verify_bundle passes again)
    (bundle / "recall_itemcf.npz").write_bytes(b"different")
    write_manifest(
        bundle,
        version="v1",
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={"interactions": "snap-7"},
        features=FEATURES,
        params={"num_leaves": 31},
        metrics={"ndcg@10": 0.31},
    )
    # Then the bundle verifies but the fingerprint differs
    assert verify_bundle(bundle) == []
    assert manifest_sha256(bundle) != before
    assert len(before) == 64
