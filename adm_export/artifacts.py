"""Artifacts on disk: manifests, content hashes and atomic writes.

Every stage writes one folder holding its files and a ``manifest.json`` (format version, stage,
model identity, config, seed, library versions, hashes of the inputs it was made from and of the
files it wrote). The next stage checks the manifest before it trusts the folder. Folders are
written under a temporary sibling name and renamed into place only when complete, so a failed or
interrupted stage never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from adm_export.version import __version__
from adm_export.errors import ArtifactNotFoundError, InvalidInputError, ManifestMismatchError, OutputExistsError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_VERSIONED_PACKAGES = (
    "torch", "diffusers", "transformers", "nvidia-modelopt", "onnx", "onnxruntime",
    "onnxruntime-gpu", "tensorrt", "tensorrt-rtx-cu13-bindings", "numpy",
)


def library_versions() -> dict[str, str]:
    """Versions of this package and of the libraries that shape its artifacts."""
    versions = {"adm-export": __version__}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(data: Any) -> str:
    """Hex SHA-256 of canonical JSON (sorted keys), for configs."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; renamed over ``path`` only if the block succeeds.

    The one way this package writes a single file that readers must never see half-written
    (JSON, reports, figures, engine plans, timing caches, shards): a failure or an interruption
    removes the temporary file and leaves any previous ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make artifacts private to their writer
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically (:func:`atomic_file`), flushed to disk before the rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (:func:`atomic_file`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, flag: str, what: str, error: type[Exception] = ManifestMismatchError,
              kind: type = dict) -> Any:
    """Read a JSON file a user pointed at; every way it can be unreadable is one line.

    Args:
        path: The file.
        flag: The option (or argument) naming it, for the message.
        what: What the file is (``manifest.json``, ``the baseline report``), for the message.
        error: The error raised for a file that exists but cannot be used.
        kind: The JSON type the top level must have.

    Raises:
        ArtifactNotFoundError: The file does not exist.
        error: It cannot be read, is not valid JSON, or its top level is not ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"{flag} {str(path)!r}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{flag} {str(path)!r}: {what} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise error(f"{flag} {str(path)!r}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(data, kind):
        raise error(f"{flag} {str(path)!r}: {what} is not a JSON {'object' if kind is dict else kind.__name__}")
    return data


def write_manifest(folder: Path, stage: str, model: dict, config: Any, inputs: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Write ``folder/manifest.json`` describing a finished stage.

    Args:
        folder: The artifact folder (its files are hashed).
        stage: Stage name (``calibration``, ``quantized``, ``onnx``, ``engine``).
        model: Model identity from :meth:`ModelAdapter.identity` (id, family, fingerprint).
        config: The stage's config as plain data.
        inputs: Hashes of the artifacts this one was made from, by stage name.
        extra: Stage-specific summary (shapes, statistics, parity).

    Returns:
        The manifest as written.
    """
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "config": config,
        "inputs": inputs or {},
        "versions": library_versions(),
        "files": files,
        **(extra or {}),
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_digest(manifest: dict) -> str:
    """A short identity of an artifact: the hash of its files' hashes and its config."""
    return sha256_json({"files": manifest.get("files"), "config": manifest.get("config")})[:16]


def read_manifest(folder: str | os.PathLike, stage: str, flag: str, verify_hashes: bool = False) -> dict:
    """Read and validate the manifest of a stage's artifact folder.

    Args:
        folder: The artifact folder.
        stage: The stage that must have written it.
        flag: The CLI flag that names this folder, for error messages.
        verify_hashes: Also compare every file's SHA-256 with the manifest (a same-size edit is
            caught too; costs one read of every file). Without it only sizes are compared.

    Raises:
        ArtifactNotFoundError: The folder or its manifest is missing.
        ManifestMismatchError: The folder belongs to another stage or format version, or a file
            listed in the manifest is missing or changed.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{flag} {str(folder)!r} is not a {stage} artifact (no {MANIFEST}); "
            f"run the {stage} stage first or point {flag} at its output folder"
        )
    try:
        manifest = read_json(path, flag, MANIFEST)
    except ManifestMismatchError as exc:
        raise ManifestMismatchError(f"{exc}; re-run the {stage} stage") from None
    if manifest.get("stage") != stage:
        raise ManifestMismatchError(
            f"{flag} {str(folder)!r} holds a {manifest.get('stage')!r} artifact, expected {stage!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatchError(
            f"{flag} {str(folder)!r} has format version {manifest.get('format_version')}, this "
            f"adm-export reads version {FORMAT_VERSION}; re-run the {stage} stage"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(i, dict) and "bytes" in i for i in files.values()):
        raise ManifestMismatchError(f"{flag} {str(folder)!r}: {MANIFEST} lists its files in an unknown form; "
                                    f"re-run the {stage} stage")
    for name, info in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != info["bytes"] or (
                verify_hashes and sha256_file(f) != info.get("sha256")):
            raise ManifestMismatchError(
                f"{flag} {str(folder)!r}: file {name!r} is missing or changed since the manifest "
                f"was written; re-run the {stage} stage"
            )
    return manifest


def check_same_model(manifest: dict, model: dict, flag: str) -> None:
    """Refuse an artifact made from another model than ``model`` (by id and weight fingerprint)."""
    theirs = manifest.get("model", {})
    for key in ("id", "fingerprint"):
        if theirs.get(key) != model.get(key):
            raise ManifestMismatchError(
                f"{flag} was made from model {theirs.get('id')!r} (fingerprint "
                f"{str(theirs.get('fingerprint'))[:12]}), not {model.get('id')!r} (fingerprint "
                f"{str(model.get('fingerprint'))[:12]}); pass --model {theirs.get('id')} or re-run "
                f"the earlier stage for this model"
            )


def check_out(out: str | os.PathLike, force: bool, flag: str = "--out") -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``force``.

    Nothing is changed on disk: a non-empty folder is replaced only when the new one is complete
    (:func:`atomic_dir`). Whether the folder can be created at all is found out by taking its lock
    (:class:`adm_export.stages.runner.OutputLock`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag} {str(out)!r} exists and is not a folder; choose another path")
    if out.is_dir() and not force and any(out.iterdir()):
        raise OutputExistsError(
            f"{flag} {str(out)!r} is not empty; pass --force to overwrite it or choose another folder"
        )


def check_file_out(path: str | os.PathLike, flag: str) -> None:
    """Refuse an output *file* that cannot be written, before any work (its folder is created).

    Raises:
        InvalidInputError: ``path`` is a folder, or no file can be created beside it.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{flag} {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise InvalidInputError(f"{flag} {str(path)!r} cannot be written: {exc.strerror or exc}; choose a writable "
                                f"path") from None


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that is renamed to ``final`` only if the block succeeds.

    Args:
        final: Where the finished folder goes.
        force: Replace an existing non-empty ``final``; otherwise refuse it.
    """
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not force:
        raise OutputExistsError(
            f"{str(final)!r} already exists and is not empty; pass --force to overwrite it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)
