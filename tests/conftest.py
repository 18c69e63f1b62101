"""Fixtures shared by several test files."""

import pytest

from cnx.tiny import write_tiny_svd


@pytest.fixture(scope="session")
def tiny_svd_dir(tmp_path_factory):
    """A stand-in SVD pipeline folder (seed 0), written once per test session."""
    return write_tiny_svd(tmp_path_factory.mktemp("tiny-svd") / "svd", seed=0)
