"""Notebooks are committed without outputs; each opens with the profile cell."""

import json

import pytest

from cnx.profiles import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_starts_with_setup(path):
    cells = json.loads(path.read_text())["cells"]
    for cell in cells:
        assert not cell.get("outputs"), f"{path.name}: outputs committed"
        assert not cell.get("execution_count"), f"{path.name}: execution count committed"
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert "setup_notebook(" in "".join(first_code["source"]), (
        f"{path.name}: first code cell must set the profile"
    )
