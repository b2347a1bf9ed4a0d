"""Every package of the source tree is one the project installs."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moequant").rglob("__init__.py")}
    assert found <= listed, f"not installed: {sorted(found - listed)}"
