"""Hugging Face model ids as ``--model-path``: resolved to a local snapshot directory in huggingface_hub's cache.

``resolve_model_path("org/name", revision)`` returns ``<cache>/models--org--name/snapshots/<commit>``, the directory
huggingface_hub keeps for that revision, downloading the files the server reads (config, safetensors, tokenizer
and generation files; not ``*.bin`` / ``*.pth`` copies) if the cache lacks them. The cache is huggingface_hub's
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``); ``HF_TOKEN`` authenticates gated and
private models; ``HF_HUB_OFFLINE=1`` uses the cached snapshot without contacting the Hub; ``HF_ENDPOINT`` names a
mirror. Everything downstream sees a plain directory.
"""

from __future__ import annotations

import os
import re

# Everything the loader and the tokenizer read; a Hub repo often also holds *.bin / *.pth copies of the weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_REPO_ID = re.compile(r"^[\w.\-]{1,96}(/[\w.\-]{1,96})?$")


def looks_like_repo_id(path: str) -> bool:
    """True for ``name`` or ``org/name`` (the Hub's characters, no ``..``, no leading or trailing ``.`` / ``-``)."""
    if not _REPO_ID.match(path) or ".." in path or "--" in path:
        return False
    return all(part[0] not in ".-" and part[-1] not in ".-" for part in path.split("/"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve_model_path(repo_id: str, revision: str | None = None, *, flag: str = "--model-path",
                       cache_dir: str | None = None, offline: bool | None = None) -> str:
    """The local snapshot directory of Hugging Face model ``repo_id`` at ``revision`` (default ``main``), from the
    cache when ``offline`` (default: ``HF_HUB_OFFLINE`` is set) or downloaded into it. ``ValueError`` naming
    ``flag`` and what to change if it cannot be had."""
    if not looks_like_repo_id(repo_id):
        raise ValueError(f"{flag} {repo_id!r} is neither a directory nor a Hugging Face model id ('org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline() if offline is None else offline
    at = f" at revision {revision!r}" if revision else ""
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError:
        raise ValueError(f"{flag} {repo_id!r}: the model is gated; accept its terms on huggingface.co and set "
                         "HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {repo_id!r} is not a local directory and not a model on the Hugging Face Hub (or "
                         "it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"{flag} {repo_id!r} has no revision {revision!r} (--revision: a branch, tag or commit)"
                         ) from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        raise ValueError(f"{flag} {repo_id!r}{at} is not a local directory, {where}, and the Hugging Face cache "
                         f"({cache_dir or 'HF_HUB_CACHE'}) holds no snapshot of it; download it where the Hub is "
                         "reachable (or unset HF_HUB_OFFLINE), or give a model directory") from None
    except OSError as e:
        raise ValueError(f"{flag} {repo_id!r}{at}: the download failed: {e}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {repo_id!r}{at}: the snapshot {path} has no config.json (is it a model repo?)")
    return path
