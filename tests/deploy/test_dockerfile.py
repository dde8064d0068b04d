"""The Dockerfile installs every package the project ships (issue 14 builds and runs the image;
until then this keeps the two in step). Before: `meshbridge_wire` was not copied, so both commands
in the image failed at import."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _packages() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]


def test_every_shipped_package_is_copied_into_the_image() -> None:
    copied = set(re.findall(r"^COPY (\S+) \./\1$", (REPO / "Dockerfile").read_text(), re.M))
    assert set(_packages()) <= copied, f"not copied: {set(_packages()) - copied}"


def test_the_image_installs_with_the_constraints() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert "pip install -c constraints.txt ." in dockerfile
