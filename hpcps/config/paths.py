"""Find a config by path, or by name in the project's configs/ directory."""

from __future__ import annotations

import os
from pathlib import Path


def configs_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[2] / "configs"   # source checkout / editable install
    return [Path.cwd() / "configs", here]


def resolve_config_path(name: str) -> str:
    if os.path.exists(name) or name.endswith(".toml") or os.sep in name:
        return name
    for folder in configs_dirs():
        candidate = folder / f"{name}.toml"
        if candidate.exists():
            return str(candidate)
    return name  # load_config reports it as missing
