"""The layout holds: the README's commands parse, --help stays light, imports point one way."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from conftest import ROOT


def readme_commands() -> list[list[str]]:
    """Every `launch.py ...` line of the README's quick start, as argv after launch.py."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = re.findall(r"^\.venv/bin/python launch\.py (.+)$", text, flags=re.M)
    return [shlex.split(line) for line in lines]


def test_readme_lists_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    parser = launch.build_parser()
    args, extra = parser.parse_known_args(argv)
    assert args.command == argv[0]
    assert all("=" in e for e in extra), extra  # only overrides may trail the options


def test_help_imports_no_torch_and_no_ray():
    code = ("import sys, launch; launch.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: the layers, no ray below cluster, config
    free of registries (a broken contract names the import chain)."""
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:]
