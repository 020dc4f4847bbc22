"""The adapter store: PEFT adapter files on disk, one directory per owner/name/sha256.

Directory names come only from validated identifiers and a hex digest, and every path is
checked to stay inside the store root, so an uploaded name can never address a file
elsewhere. Files are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import DataLoss, InvalidArgument
from services.common.names import check_adapter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_IGNORED = {"README.md"}
# Formats that unpickle on load: refused outright, never written to disk.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()


def collect_files(files: dict[str, bytes], expected_sha256: str = "") -> AdapterFiles:
    """Check an uploaded PEFT directory's files: safetensors only, both files present."""
    for name in files:
        if name != os.path.basename(name) or name in {"", ".", ".."} or "\\" in name:
            raise InvalidArgument(
                f"file name {name!r} must be a plain base name", reason="BAD_FILE"
            )
        if name.lower().endswith(_PICKLE_SUFFIXES):
            raise InvalidArgument(
                f"{name} is a pickle-based checkpoint; only safetensors adapters are accepted "
                "(save with safe_serialization=True)",
                reason="PICKLE_REFUSED",
            )
        if name not in {CONFIG_FILE, WEIGHTS_FILE, *_IGNORED}:
            raise InvalidArgument(f"unexpected file {name!r} in adapter", reason="BAD_FILE")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise InvalidArgument(f"adapter is missing {', '.join(missing)}", reason="MISSING_FILE")
    adapter = AdapterFiles(config=files[CONFIG_FILE], weights=files[WEIGHTS_FILE])
    if expected_sha256 and expected_sha256.lower() != adapter.sha256:
        raise InvalidArgument(
            f"sha256 mismatch: expected {expected_sha256}, uploaded weights have {adapter.sha256}",
            reason="SHA256_MISMATCH",
        )
    return adapter


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, owner: str, name: str, sha256: str) -> Path:
        check_adapter_name(name)
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidArgument("bad sha256", reason="BAD_SHA256")
        path = (self.root / owner / name / sha256).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"adapter name {name!r} escapes the store", reason="BAD_NAME")
        return path

    def save(self, owner: str, name: str, files: AdapterFiles) -> str:
        """Write the files (idempotent: same content, same place); return the relative path."""
        target = self._dir(owner, name, files.sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".upload-"))
            (tmp / CONFIG_FILE).write_bytes(files.config)
            (tmp / WEIGHTS_FILE).write_bytes(files.weights)
            try:
                tmp.rename(target)
            except OSError:  # a concurrent upload of the same content won the race
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target.relative_to(self.root))

    def load(self, owner: str, name: str, sha256: str) -> AdapterFiles:
        """Read an adapter back, verifying its sha256 against the registry's record."""
        path = self._dir(owner, name, sha256)
        try:
            files = AdapterFiles(
                config=(path / CONFIG_FILE).read_bytes(), weights=(path / WEIGHTS_FILE).read_bytes()
            )
        except FileNotFoundError as err:
            raise DataLoss(
                f"files of adapter {name!r} are missing from the adapter store",
                reason="ADAPTER_FILES_MISSING",
            ) from err
        if files.sha256 != sha256:
            raise DataLoss(
                f"adapter {name!r} failed its integrity check (sha256 differs from registration)",
                reason="SHA256_MISMATCH",
            )
        return files
