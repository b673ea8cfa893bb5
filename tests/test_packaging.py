"""What installing the project declares: an SPDX license, and dependencies that are used."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "hwbkptd", ROOT / "client" / "hwbkpt", ROOT / "proto" / "hwbkpt_proto"]
# distribution name -> the module it installs
MODULE_OF = {"python-ptrace": "ptrace", "pyelftools": "elftools"}


def _pyproject() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_license_is_an_spdx_expression() -> None:
    # A TOML table (`{ text = "MIT" }`) makes setuptools print a deprecation banner at
    # every install; PEP 639 wants an SPDX expression, which lands in License-Expression.
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == "MIT"
    assert importlib.metadata.metadata("hwbkptd")["License-Expression"] == "MIT"


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for package in SHIPPED:
        for path in package.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found


def test_every_declared_dependency_is_imported_by_shipped_code() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    names = [re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    imported = _imported_modules()
    unused = [n for n in names if MODULE_OF.get(n, n) not in imported]
    assert unused == []
