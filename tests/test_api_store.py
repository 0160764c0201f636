"""The adapter store on its own: names, traversal, atomic publish, races, digests, removal."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from server.store import (
    AdapterExistsError,
    AdapterMissingError,
    AdapterStore,
    InvalidAdapterNameError,
    StoreError,
    check_adapter_name,
    tree_digest,
)
from tests.api_harness import tree_hash

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def stage(store: AdapterStore, staged: Path, weights: bytes = b"weights") -> None:
    (staged / "adapter_config.json").write_text(json.dumps(CONFIG))
    (staged / "adapter_model.safetensors").write_bytes(weights)


@pytest.mark.parametrize("name", ["a", "A9", "llama-3_sql.v2", "x" * 128, "0"])
def test_valid_names(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "-x", "_x", "x" * 129, "a b", "a\x00b", "é", None, 3],
)
def test_invalid_names(tmp_path, name):
    with pytest.raises(InvalidAdapterNameError):
        check_adapter_name(name)
    store = AdapterStore(tmp_path)
    assert not store.exists(name)
    with pytest.raises(InvalidAdapterNameError):
        store.path_of(name)


def test_commit_publishes_atomically_with_a_checkable_digest(tmp_path):
    store = AdapterStore(tmp_path / "store")
    with store.staging() as staged:
        stage(store, staged)
        assert store.names() == []  # staged files are invisible
        info = store.commit(staged, "alpha")
    assert store.names() == ["alpha"] and store.exists("alpha")
    assert info.rank == 4 and info.target_modules == ["q_proj", "v_proj"]
    assert info.size_bytes == sum(p.stat().st_size for p in (tmp_path / "store" / "alpha").iterdir())
    manifest = "".join(
        f"{hashlib.sha256((info.path / f).read_bytes()).hexdigest()}  {f}\n"
        for f in sorted(["adapter_config.json", "adapter_model.safetensors"])
    )
    assert info.digest == hashlib.sha256(manifest.encode()).hexdigest() == tree_digest(info.path)
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["alpha"]  # no staging left behind


def test_commit_onto_an_existing_name_fails_and_changes_nothing(tmp_path):
    store = AdapterStore(tmp_path)
    with store.staging() as staged:
        stage(store, staged, b"first")
        store.commit(staged, "alpha")
    before = tree_hash(tmp_path)
    with pytest.raises(AdapterExistsError), store.staging() as staged:
        stage(store, staged, b"second")
        store.commit(staged, "alpha")
    assert tree_hash(tmp_path) == before


def test_only_staging_dirs_of_this_store_can_be_committed(tmp_path):
    store = AdapterStore(tmp_path / "store")
    elsewhere = tmp_path / ".staging-x"
    elsewhere.mkdir()
    with pytest.raises(StoreError):
        store.commit(elsewhere, "alpha")


def test_racing_commits_of_one_name_have_exactly_one_winner(tmp_path):
    """Separate store objects (as separate replicas would have) racing on the same directory."""
    racers = 8
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []

    def race(i: int) -> None:
        store = AdapterStore(tmp_path)
        with store.staging() as staged:
            stage(store, staged, f"racer {i}".encode())
            barrier.wait()
            try:
                store.commit(staged, "contested")
                outcomes.append("won")
            except AdapterExistsError:
                outcomes.append("409")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["409"] * (racers - 1) + ["won"]
    assert [p.name for p in tmp_path.iterdir()] == ["contested"]
    assert (tmp_path / "contested" / "adapter_model.safetensors").read_bytes().startswith(b"racer ")


def test_listing_skips_hidden_incomplete_and_symlinked_entries(tmp_path):
    store = AdapterStore(tmp_path / "store")
    root = tmp_path / "store"
    (root / ".staging-abc").mkdir()
    (root / "no-config").mkdir()
    (root / "bad name").mkdir()
    (root / "bad name" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    os.symlink(outside, root / "linked")
    with store.staging() as staged:
        stage(store, staged)
        store.commit(staged, "real")
    assert store.names() == ["real"]
    assert not store.exists("linked")


def test_remove_hides_at_once_and_purge_deletes(tmp_path):
    store = AdapterStore(tmp_path)
    with store.staging() as staged:
        stage(store, staged)
        store.commit(staged, "alpha")
    trash = store.remove("alpha")
    assert not store.exists("alpha") and store.names() == [] and trash.exists()
    store.purge(trash)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AdapterMissingError):
        store.remove("alpha")
    with pytest.raises(AdapterMissingError):
        store.describe("alpha")


def test_digest_follows_file_changes(tmp_path):
    store = AdapterStore(tmp_path)
    with store.staging() as staged:
        stage(store, staged, b"v1")
        first = store.commit(staged, "alpha").digest
    assert store.digest("alpha") == first
    weights = tmp_path / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(b"v2-longer")
    assert store.digest("alpha") != first
    assert store.digest("alpha") == tree_digest(tmp_path / "alpha")
