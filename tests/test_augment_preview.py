"""``launch.py augment-preview``: a PNG grid for images, a markdown table for text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import CONFIGS, need_shared
from PIL import Image

import launch


def test_image_preview_writes_a_grid_of_originals_and_variants(tmp_path: Path, capsys):
    out = tmp_path / "grid.png"
    rc = launch.main(["augment-preview", str(CONFIGS / "tiny-digits.yaml"),
                      "augment.policy=classic", "augment.strength=1",
                      "augment.params={rotation: 20, shift: 0.2, flip: true}",
                      "--out", str(out), "--n", "3"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert w > h * 1.1  # 4 columns (original + 3 variants) by 3 rows
    assert pixels.std() > 10  # something was drawn


def test_text_preview_writes_a_table_of_variants(tmp_path: Path):
    need_shared("data", "text", "sst2")
    out = tmp_path / "variants.png"
    rc = launch.main(["augment-preview", str(CONFIGS / "sst2-minilm.yaml"),
                      "augment.policy=deletion",
                      "data.max_test=10", "--out", str(out), "--n", "4"])
    assert rc == 0
    lines = (tmp_path / "variants.md").read_text().splitlines()
    assert lines[0].startswith("| label | original | deletion #1")
    rows = [line.strip("|").split(" | ") for line in lines[2:]]
    assert len(rows) == 4 and {r[0].strip() for r in rows} == {"negative", "positive"}
    for _label, original, *variants in rows:
        assert all(v.strip() != original.strip() for v in variants)


def test_preview_names_a_bad_param(tmp_path: Path, capsys):
    rc = launch.main(["augment-preview", str(CONFIGS / "tiny-digits.yaml"),
                      "augment.policy=classic", "augment.params={rotatoin: 20}",
                      "--out", str(tmp_path / "g.png")])
    assert rc == 2
    assert "augment.params.rotatoin: unknown parameter" in capsys.readouterr().err
