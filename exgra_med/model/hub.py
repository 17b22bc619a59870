"""Hugging Face Hub ids wherever a model, vision tower or projector path is accepted.

`resolve_path("owner/name")` returns the local snapshot folder that `huggingface_hub.snapshot_download` finds in the
cache or downloads, so the cache (`HF_HUB_CACHE`, `HF_HOME`), revisions (`owner/name@revision`), offline mode
(`HF_HUB_OFFLINE=1`) and tokens (`HF_TOKEN`, `hf auth login`) behave as in every other HF tool. A local file or
folder is returned unchanged, so existing paths keep working. Vision towers also take open_clip's forms:
`hf-hub:owner/name` (BiomedCLIP on the Hub) and `local-dir:DIR`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, list_repo_files, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from exgra_med import __version__

logger = logging.getLogger(__name__)

OPEN_CLIP_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_LOCAL_PREFIX = "local-dir:"
# Weights of other frameworks: never read here, so never downloaded.
FOREIGN_FORMATS = ("*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.gguf",
                   "onnx/*", "coreml/*", "openvino/*", "flax_model*", "tf_model*")
# A pickle weights file that is skipped when the repository also holds its safetensors twin (loaders prefer it).
_PICKLE_TWINS = {
    "pytorch_model*.bin": "model*.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
    "mm_projector.bin": "mm_projector.safetensors",
}


class HubResolutionError(FileNotFoundError):
    """A path that is neither a local file or folder nor a usable Hub repository (unknown, offline and not cached,
    or a snapshot that lacks a file the caller needs)."""


def split_revision(name: str) -> tuple[str, str | None]:
    """`owner/name@revision` -> (`owner/name`, `revision`); without `@`, revision None (the default branch)."""
    repo_id, sep, revision = name.partition("@")
    return repo_id, (revision if sep and revision else None)


def ignore_patterns(repo_files: Sequence[str] | None) -> list[str]:
    """Files of a repository not to download: other frameworks' weights, and pickle weights whose safetensors
    version is also there (known only online, from the repository's file list)."""
    patterns = list(FOREIGN_FORMATS)
    for pickle, twin in _PICKLE_TWINS.items():
        if repo_files and any(fnmatch.fnmatch(f, twin) for f in repo_files):
            patterns.append(pickle)
    return patterns


def _repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The file list of a Hub repository, or None offline or when the Hub cannot say (snapshot_download then
    reports the reason)."""
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - any failure is reported by snapshot_download with its own message
        return None


def _download(name: str, what: str) -> Path:
    repo_id, revision = split_revision(name)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubResolutionError(f"{name}: no such local {what} file or folder (nor a Hub repository id)") from None
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = snapshot_download(
            repo_id, revision=revision, ignore_patterns=ignore_patterns(_repo_files(repo_id, revision)),
            library_name="exgra-med", library_version=__version__,
        )
    except GatedRepoError:
        raise HubResolutionError(
            f"{where}: a gated Hub repository; accept its conditions on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise HubResolutionError(
            f"{where}: no such local {what} folder, and no such repository on the Hugging Face Hub (a private one "
            "needs `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise HubResolutionError(f"{where}: the Hub repository {repo_id} has no revision {revision!r}") from None
    except IncompleteSnapshotError as e:
        raise HubResolutionError(
            f"{where}: the cached snapshot {e.snapshot_path} is incomplete and the Hub cannot be reached; finish the "
            f"download with `hf download {repo_id}` while online"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache {constants.HF_HUB_CACHE}"
        else:
            reason = f"the Hub cannot be reached and it is not in the Hugging Face cache {constants.HF_HUB_CACHE}"
        raise HubResolutionError(
            f"{where}: no such local {what} folder; as a Hub id: {reason} (download it with `hf download {repo_id}`, "
            "or point HF_HUB_CACHE at the cache that holds it)"
        ) from None
    except HfHubHTTPError as e:
        raise HubResolutionError(f"{where}: the Hub refused the download: {e}") from None
    logger.info("%s: Hub snapshot %s", where, folder)
    return Path(folder)


def resolve_path(name: str | Path, what: str = "model", require: Sequence[str] = ()) -> str:
    """`name` when it is a local file or folder; else the local snapshot folder of the Hub repository `name`
    (`owner/name[@revision]`), from the cache or downloaded.

    `require`: file names of which a Hub snapshot must hold at least one (a clear error names the repository
    otherwise). Raises HubResolutionError (a FileNotFoundError) with a one-line reason.
    """
    name = str(name)
    if Path(name).exists():
        return name
    folder = _download(name, what)
    if require and not any((folder / f).is_file() for f in require):
        raise HubResolutionError(
            f"{name}: the Hub snapshot {folder} has no {' or '.join(require)}; is it a {what} repository?"
        )
    return str(folder)


def resolve_vision_tower(name: str) -> str:
    """A vision-tower argument in local form: `hf-hub:owner/name` (open_clip's Hub form) -> `local-dir:SNAPSHOT`,
    a plain Hub id -> its snapshot folder; local folders and `local-dir:DIR` unchanged."""
    if name.startswith(OPEN_CLIP_LOCAL_PREFIX):
        return name
    if name.startswith(OPEN_CLIP_HUB_PREFIX):
        folder = resolve_path(name[len(OPEN_CLIP_HUB_PREFIX):], "open_clip vision tower",
                              require=("open_clip_config.json",))
        return OPEN_CLIP_LOCAL_PREFIX + folder
    return resolve_path(name, "vision tower", require=("config.json", "open_clip_config.json"))
