"""The on-disk contract between export, engines and runtime.

An artifact folder (default ``./sdxl-artifacts``) holds::

    manifest.json                 export manifest (this module's ``EXPORT_MANIFEST``)
    onnx/<component>/model.onnx   one graph per component (+ external data file)
    tokenizer/ tokenizer_2/       the tokenizers, as save_pretrained writes them
    scheduler/ refiner_scheduler/ scheduler configs
    engines/manifest.json         engine store manifest (``ENGINE_MANIFEST``)
    engines/...                   TensorRT plans or ONNX Runtime twin graphs

Every file is written atomically (temporary name in the same folder, fsync, rename),
so a process killed mid-write never leaves a file that a later run trusts: readers only
trust files listed in a manifest with a matching sha256, and the manifest itself is
written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import ARTIFACT_FORMAT_VERSION, __version__
from .errors import ArtifactError, CorruptArtifactError, IncompatibleManifestError, MissingComponentError

DEFAULT_ARTIFACTS = Path("sdxl-artifacts")
EXPORT_MANIFEST = "manifest.json"
ENGINE_DIR = "engines"
ENGINE_MANIFEST = "manifest.json"
FORMAT_EXPORT = "sdxl-export/onnx"
FORMAT_ENGINES = "sdxl-export/engines"
TMP_PREFIX = ".tmp-"


# ---- atomic writes ------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final``.

    On any exception (or a kill) only a ``.tmp-*`` folder is left, which no reader
    trusts and the next writer removes (:func:`clean_stale_tmp`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(TMP_PREFIX + final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_tmp(folder: str | Path) -> int:
    """Remove ``.tmp-*`` leftovers of interrupted writes below ``folder``; return how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in list(folder.rglob(TMP_PREFIX + "*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        n += 1
    return n


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (which must exist) or fail at once.

    Two writers of one folder would waste work and race on its manifest. The lock is
    released when the process dies, so a killed run never leaves the folder locked.
    """
    from .errors import OutputDirError

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover -- no advisory locks on this OS
            pass
        except BlockingIOError:
            raise OutputDirError(f"another sdxl-export {what} is writing to {folder}", fix) from None
        yield
    finally:
        os.close(fd)


# ---- hashing ---------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def verify_files(root: str | Path, files: dict[str, str], what: str) -> None:
    """Check that every ``relpath -> sha256`` in ``files`` exists under ``root`` and matches."""
    root = Path(root)
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise MissingComponentError(
                f"{what}: {p} is missing", "rerun the command that wrote this folder (export or build)"
            )
        if sha256_file(p) != digest:
            raise CorruptArtifactError(
                f"{what}: {p} does not match its manifest hash (corrupt or modified)",
                "rerun the command that wrote this folder (export or build) to rewrite it",
            )


# ---- manifests ---------------------------------------------------------------------------------
def manifest_header(fmt: str) -> dict[str, Any]:
    return {"format": fmt, "format_version": ARTIFACT_FORMAT_VERSION, "sdxl_export_version": __version__}


def read_manifest(path: str | Path, fmt: str, fix: str) -> dict[str, Any]:
    """Read a manifest and check that it is ours and of a compatible format version.

    ``fix`` is the command that rewrites it (shown in every error).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: not an sdxl-export artifact folder", fix)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"{path} is not valid JSON ({exc.__class__.__name__})", fix) from None
    got_fmt = data.get("format") if isinstance(data, dict) else None
    if got_fmt != fmt:
        raise ArtifactError(
            f"{path} was not written by sdxl-export (format {got_fmt!r}, expected {fmt!r})", fix
        )
    got = str(data.get("format_version", "0"))
    if got.split(".")[0] != ARTIFACT_FORMAT_VERSION.split(".")[0]:
        raise IncompatibleManifestError(
            f"{path} has format version {got}; this sdxl-export {__version__} reads {ARTIFACT_FORMAT_VERSION}",
            fix,
        )
    return data
