"""The source distribution: built from the tracked files, it holds every one of them that is
not a dotfile (the tests with their helpers, the contract, the benchmarks, the deployment
files), and the license text, which the wheel carries too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    """The files git tracks in this tree (the test needs a git checkout: CI's is one)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of tierdisk (the source distribution is made from one)")
    out = subprocess.run(
        [git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name]


def build(kind: str, source: Path, out: Path) -> Path:
    """Build an sdist or a wheel of ``source`` into ``out`` with setuptools' own backend
    (what ``pip`` and ``python -m build`` call), offline."""
    call = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", call], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A copy of the tracked files (a build writes beside them)."""
    files = tracked_files()
    copy = tmp_path_factory.mktemp("src")
    for name in files:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    return copy, files


def test_the_sdist_holds_every_tracked_file_and_the_license(
    source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    copy, files = source
    sdist = build("sdist", copy, tmp_path)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in tar.getnames()}
        info = tar.extractfile(f"{top}/PKG-INFO")
        assert info is not None
        metadata = info.read().decode()
    wanted = {name for name in files if not name.startswith(".")}
    assert wanted - names == set()
    assert {"LICENSE", "tests/conftest.py", "tests/servers.py", "docs/DESIGN.md"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert "License-File: LICENSE" in metadata


def test_the_wheel_carries_the_license(source: tuple[Path, list[str]], tmp_path: Path) -> None:
    copy, _ = source
    wheel = build("wheel", copy, tmp_path)
    with zipfile.ZipFile(wheel) as zipped:
        licenses = [n for n in zipped.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert licenses
        assert zipped.read(licenses[0]).startswith(b"MIT License")
