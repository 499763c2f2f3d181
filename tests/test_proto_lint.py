"""The protos pass `buf lint` with the STANDARD rules (buf from PyPI `buf-bin`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import google.type.date_pb2

from tests.conftest import ROOT

BUF = Path(sys.executable).parent / "buf"  # installed by `make setup` (buf-bin)


def test_buf_lint_standard(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto" / "kpisettle", tmp_path / "kpisettle")
    shutil.copy(ROOT / "proto" / "buf.yaml", tmp_path / "buf.yaml")
    googleapis = Path(google.type.date_pb2.__file__).resolve().parent.parent
    for package in ("api", "type", "rpc"):
        shutil.copytree(googleapis / package, tmp_path / "google" / package, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    done = subprocess.run([str(BUF), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
