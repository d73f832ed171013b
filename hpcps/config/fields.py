"""What a config field is, and the registry the section modules fill.

Every key is ``section.name`` (top-level keys have an empty section). A field has
a kind (int, float, str, bool), a default, a one-line help, and optional
choices / numeric bounds. The sections live in ``fields_*.py``, each importing
only this module; ``hpcps.config.schema`` imports them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

AUTO = "auto"


@dataclass(frozen=True)
class Field:
    key: str                      # "train.lr" or "out_dir"
    kind: str                     # "int" | "float" | "str" | "bool" | "int_or_auto"
    default: Any
    help: str
    choices: Optional[tuple] = None
    min: Optional[float] = None   # inclusive lower bound
    max: Optional[float] = None   # inclusive upper bound
    min_exclusive: bool = False   # True: value must be > min
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error text or None

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


SECTION_HELP: dict[str, str] = {}
FIELDS: dict[str, Field] = {}


def section(name: str, help: str) -> None:
    SECTION_HELP[name] = help


def field(key: str, kind: str, default: Any, help: str, **kw) -> None:
    if key in FIELDS:
        raise ValueError(f"config field {key} defined twice")
    FIELDS[key] = Field(key, kind, default, help, **kw)
