"""Fixtures shared by several test modules.

- ``shakespeare_path`` / ``shakespeare_corpus``: the standard corpus (a sibling
  ``shared/data`` folder of the repository), prepared once per session at
  character level. Where it is absent, ~1.1 M characters of the embedded default
  corpus stand in, so the suite runs in full on any machine; ``real_shakespeare``
  skips the few tests that check Shakespeare's own properties.
- ``make_corpus``: prepare a small corpus from a text given inline.
- ``mpi_impl``: runs a test once per MPI implementation (see ``mpi_util``);
  ``net_impl``: once per implementation through its network module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mpi_util import IMPLEMENTATIONS, require_implementation

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
FALLBACK_CHARS = 1_115_394  # as many characters as tiny Shakespeare
FORCE_FALLBACK = "HPCPS_TEST_NO_SHAKESPEARE"  # =1: test the fallback where Shakespeare exists


def have_shakespeare() -> bool:
    return SHAKESPEARE.exists() and os.environ.get(FORCE_FALLBACK, "") != "1"


def fallback_text() -> str:
    """Where the standard corpus is absent: the first ~1.1 M characters of the embedded
    default corpus (the standard library's modules, sorted by name), the same on every
    machine with this Python."""
    from hpcps.data.default_corpus import default_corpus_files
    parts, size = [], 0
    for path in default_corpus_files():
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        size += len(text)
        if size >= FALLBACK_CHARS:
            break
    return "".join(parts)[:FALLBACK_CHARS]


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """The standard corpus text; without it, the fallback text (see ``fallback_text``)."""
    if have_shakespeare():
        return SHAKESPEARE
    path = tmp_path_factory.mktemp("fallback") / "stdlib_text.txt"
    path.write_text(fallback_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def real_shakespeare() -> None:
    """For the few tests that check properties of tiny Shakespeare itself (vocab 65)."""
    if not have_shakespeare():
        pytest.skip(f"standard corpus not found: {SHAKESPEARE}")


@pytest.fixture(scope="session")
def shakespeare_corpus(shakespeare_path, tmp_path_factory) -> Path:
    """The standard text prepared at character level (vocab 65, 90/10 split), once per
    session; the fallback text where it is absent (vocab ~100)."""
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


@pytest.fixture(params=[f"{impl}+net" for impl in IMPLEMENTATIONS])
def net_impl(request) -> str:
    """The network path of each MPI (see ``mpi_util``): MPICH with every rank its own node
    (``MPIR_CVAR_NOLOCAL=1``), Open MPI with every rank on its own fake node over TCP."""
    require_implementation(request.param)
    return request.param


@pytest.fixture(params=IMPLEMENTATIONS)
def mpi_impl(request) -> str:
    """Each MPI test runs under MPICH and under Open MPI (skipped when not installed,
    a failure when HPCPS_REQUIRE_OPENMPI=1)."""
    require_implementation(request.param)
    return request.param
