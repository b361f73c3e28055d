"""Hugging Face model ids resolved through huggingface_hub's cache layout (no network: ``offline=True`` and a cache
directory built here as the library documents it: ``models--{org}--{name}/refs/{branch or tag}`` holding a commit
hash, ``snapshots/{commit}/`` holding the files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.models.hub import looks_like_repo_id, resolve_model_path

MAIN = "a" * 40
V2 = "b" * 40


def hub_cache(root: Path, repo_id: str, refs: dict[str, str]) -> Path:
    """A huggingface_hub cache holding ``repo_id`` with one snapshot per commit in ``refs`` (ref name -> commit);
    each snapshot's config.json names its commit, so a test can tell them apart."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for ref, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "commit": commit}))
    return root


def commit_of(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text())["commit"]


def test_ids_resolve_to_their_cached_snapshot(tmp_path):
    cache = hub_cache(tmp_path, "org/tiny", {"main": MAIN, "v2": V2})
    path = resolve_model_path("org/tiny", cache_dir=str(cache), offline=True)
    assert Path(path) == cache / "models--org--tiny" / "snapshots" / MAIN and commit_of(path) == MAIN
    assert commit_of(resolve_model_path("org/tiny", "v2", cache_dir=str(cache), offline=True)) == V2
    assert commit_of(resolve_model_path("org/tiny", V2, cache_dir=str(cache), offline=True)) == V2  # a commit


def test_missing_ids_and_revisions_say_what_to_do(tmp_path):
    cache = str(hub_cache(tmp_path, "org/tiny", {"main": MAIN}))
    with pytest.raises(ValueError, match=r"--model-path 'org/other' is not a local directory, HF_HUB_OFFLINE is set"):
        resolve_model_path("org/other", cache_dir=cache, offline=True)
    with pytest.raises(ValueError, match=r"'org/tiny' at revision 'v9'.*holds no snapshot"):
        resolve_model_path("org/tiny", "v9", cache_dir=cache, offline=True)


def test_snapshot_without_config_is_refused(tmp_path):
    cache = hub_cache(tmp_path, "org/data", {"main": MAIN})
    (cache / "models--org--data" / "snapshots" / MAIN / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path("org/data", cache_dir=str(cache), offline=True)


@pytest.mark.parametrize("path, ok", [
    ("meta-llama/Llama-3.1-8B-Instruct", True), ("gpt2", True), ("Qwen/Qwen3-0.6B", True),
    ("/models/llama", False), ("./llama", False), ("a/b/c", False), ("org/../x", False), ("org/name-", False),
    ("org--x/name", False), ("", False),
])
def test_repo_id_form(path, ok):
    assert looks_like_repo_id(path) is ok
