"""The shape of the tierdisk.client package (client/__init__.py): ``__all__`` agrees with
the names the package imports on first use, every name resolves, and the package never
imports the server (DESIGN.md §1)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tierdisk.client as client_pkg

ROOT = Path(__file__).resolve().parent.parent


def _type_checking_imports() -> dict[str, str]:
    """What ``client/__init__.py`` imports under ``if TYPE_CHECKING:`` (what type checkers
    see): each name, and the submodule it comes from."""
    tree = ast.parse((ROOT / "client" / "__init__.py").read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1, ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname is None, ast.unparse(stmt)
                    assert alias.name not in found, alias.name
                    found[alias.name] = stmt.module or ""
    return found


def test_all_is_explicit_and_resolves() -> None:
    """The package is built from three lists that must agree: ``__all__``, ``_DEFINED_IN``
    (what ``__getattr__`` imports on first use) and the ``TYPE_CHECKING`` imports; and each
    name is the object its submodule defines and exports."""
    assert len(set(client_pkg.__all__)) == len(client_pkg.__all__)
    assert set(client_pkg.__all__) == set(client_pkg._DEFINED_IN)
    assert _type_checking_imports() == client_pkg._DEFINED_IN
    for name in client_pkg.__all__:
        assert hasattr(client_pkg, name), name
        module = importlib.import_module(f"tierdisk.client.{client_pkg._DEFINED_IN[name]}")
        assert name in module.__all__, (name, module.__name__)
        assert getattr(client_pkg, name) is getattr(module, name), name
    assert (ROOT / "client" / "py.typed").exists()


def test_client_never_imports_the_server() -> None:
    """DESIGN §1: tierdisk.client depends only on tierdisk.v1 and grpc."""
    for path in (ROOT / "client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level:
                    assert node.module != "service", path
            for name in names:
                assert not name.startswith("tierdisk.service"), f"{path.name} imports {name}"
    code = (
        "import sys, tierdisk.client, tierdisk.client.cli, tierdisk.client.sync;"
        "print(sorted(m for m in sys.modules if m.startswith('tierdisk.service')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


_CLOSING = """
import contextlib

from tierdisk.client import AsyncClient, Client, ResizeEvent


def blocking(client: Client) -> ResizeEvent:
    with contextlib.closing(client.volume("v").watch_resize()) as events:
        first = next(events)
    chunks = client.volume("v").stream_read(0, 8)
    chunks.close()
    return first


async def asynchronous(client: AsyncClient) -> ResizeEvent:
    async with contextlib.aclosing(client.volume("v").watch_resize()) as events:
        first = await anext(events)
    await client.volume("v").stream_read(0, 8).aclose()
    return first
"""


def test_closing_a_watch_or_a_stream_read_type_checks(tmp_path: Path) -> None:
    """The docs say to close ``watch_resize()`` and ``stream_read()`` to stop them; a
    program doing so with ``close()`` / ``aclose()`` or ``contextlib.closing`` /
    ``aclosing`` passes ``mypy --strict`` (they were typed Iterator / AsyncIterator, which
    have neither: four errors)."""
    pytest.importorskip("mypy")
    program = tmp_path / "closing.py"
    program.write_text(_CLOSING)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-incremental",
            str(program),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / ".typecheck")},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
