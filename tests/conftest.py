"""Fixtures shared by several test modules.

- ``shakespeare_path`` / ``shakespeare_corpus``: the standard corpus (a sibling
  ``shared/data`` folder of the repository), prepared once per session at
  character level; tests that need it skip when it is absent.
- ``make_corpus``: prepare a small corpus from a text given inline.
- ``mpi_impl``: runs a test once per MPI implementation (see ``mpi_util``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mpi_util import IMPLEMENTATIONS, require_implementation

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"standard corpus not found: {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_corpus(shakespeare_path, tmp_path_factory) -> Path:
    """tinyshakespeare prepared at character level (vocab 65, 90/10 split), once per session."""
    from hpcps.data.prepare import prepare
    out = tmp_path_factory.mktemp("corpus") / "shakespeare_char.h5"
    prepare([str(shakespeare_path)], str(out), tokenizer="char", quiet=True)
    return out


@pytest.fixture
def make_corpus(tmp_path):
    """``make_corpus(text, tokenizer="char") -> path`` of a freshly prepared corpus."""
    from hpcps.data.prepare import prepare
    counter = iter(range(1_000_000))

    def build(text: str, tokenizer: str = "char", val_fraction: float = 0.1) -> Path:
        i = next(counter)
        src = tmp_path / f"text{i}.txt"
        src.write_text(text, encoding="utf-8")
        out = tmp_path / f"corpus{i}.h5"
        prepare([str(src)], str(out), tokenizer=tokenizer, val_fraction=val_fraction, quiet=True)
        return out
    return build


@pytest.fixture(params=IMPLEMENTATIONS)
def mpi_impl(request) -> str:
    """Each MPI test runs under MPICH and under Open MPI (skipped when not installed,
    a failure when HPCPS_REQUIRE_OPENMPI=1)."""
    require_implementation(request.param)
    return request.param
