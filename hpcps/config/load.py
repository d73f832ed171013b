"""Load a TOML config, apply ``key=value`` overrides, validate against the schema.

Every problem is a ``UserError`` naming the key (with the nearest valid key for a
typo), so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from types import SimpleNamespace
from typing import Any, Iterable, Optional

from hpcps.config.schema import AUTO, FIELDS, SECTION_HELP, Field
from hpcps.errors import UserError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class Config:
    """Resolved configuration: ``cfg.train.lr``, ``cfg.out_dir``, ``cfg["train.lr"]``."""

    def __init__(self, values: dict[str, Any], source: str = "", given: Iterable[str] = (),
                 overridden: Iterable[str] = ()):
        self._values = dict(values)
        self.source = source
        # the keys the TOML file or the overrides set (the rest are defaults), and those the
        # overrides set: a value taken from elsewhere (train.init_from's model shape) may
        # replace a default, replaces a file's value with a note, and never an override
        self.given = frozenset(given)
        self.overridden = frozenset(overridden)
        for section in SECTION_HELP:
            if section:
                setattr(self, section, SimpleNamespace())
        for key, value in self._values.items():
            section, _, name = key.rpartition(".")
            setattr(getattr(self, section) if section else self, name, value)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some keys changed (keys given with '__' for '.'), re-validated."""
        values = dict(self._values)
        for k, v in changes.items():
            values[k.replace("__", ".")] = v
        return Config(validate(values), self.source, self.given, self.overridden)

    def to_toml(self) -> str:
        return dump_toml(self._values)

    def digest(self) -> str:
        """Stable hash of the resolved values: ranks compare it to catch differing configs."""
        blob = json.dumps(self._values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def checkpoint_dir(self) -> str:
        return self._values["checkpoint.dir"] or os.path.join(self._values["out_dir"], "checkpoints")


def nearest_key(key: str) -> Optional[str]:
    candidates = list(FIELDS)
    short = {f.name: f.key for f in FIELDS.values()}
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    match = difflib.get_close_matches(key.rpartition(".")[2], list(short), n=1, cutoff=0.6)
    return short[match[0]] if match else None


def _unknown(key: str, where: str) -> UserError:
    hint = nearest_key(key)
    tail = f" (did you mean '{hint}'?)" if hint else ""
    return UserError(f"unknown config key '{key}'{where}{tail}")


def resolve_key(key: str) -> str:
    """Accept 'train.lr' or a bare 'lr' when the name is unique across sections."""
    if key in FIELDS:
        return key
    if "." not in key:
        owners = [f.key for f in FIELDS.values() if f.name == key]
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            raise UserError(f"config key '{key}' is ambiguous: use one of {', '.join(owners)}")
    raise _unknown(key, "")


def coerce(fld: Field, value: Any) -> Any:
    """Type-check one value (TOML-typed or from a key=value string) against its field."""
    kind = fld.kind
    if kind == "int_or_auto" and value == AUTO:
        return AUTO
    if kind in ("int", "int_or_auto"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                extra = " or 'auto'" if kind == "int_or_auto" else ""
                raise UserError(f"config key '{fld.key}': expected an integer{extra}, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{fld.key}': expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"config key '{fld.key}': expected a finite number, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"config key '{fld.key}': expected true or false, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise UserError(f"config key '{fld.key}': expected a string, got {value!r}")
    if fld.choices is not None and value not in fld.choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in fld.choices], n=1)
        tail = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"config key '{fld.key}': {value!r} is not one of "
                        f"{', '.join(map(str, fld.choices))}{tail}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if fld.min is not None and (value < fld.min or (fld.min_exclusive and value == fld.min)):
            op = ">" if fld.min_exclusive else ">="
            raise UserError(f"config key '{fld.key}': must be {op} {fld.min:g}, got {value!r}")
        if fld.max is not None and value > fld.max:
            raise UserError(f"config key '{fld.key}': must be <= {fld.max:g}, got {value!r}")
    if fld.check is not None:
        problem = fld.check(value)
        if problem:
            raise UserError(f"config key '{fld.key}': {problem}")
    return value


def parse_override_value(text: str) -> Any:
    """'3e-4' -> 3e-4, 'true' -> True, '"x"' -> 'x', anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def validate(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, fld in FIELDS.items():
        out[key] = coerce(fld, values.get(key, fld.default))
    _cross_checks(out)
    return out


def _cross_checks(v: dict[str, Any]) -> None:
    if v["model.n_embd"] % v["model.n_head"]:
        raise UserError(f"config keys 'model.n_embd' ({v['model.n_embd']}) must be divisible by "
                        f"'model.n_head' ({v['model.n_head']})")
    if v["train.min_lr"] > v["train.lr"]:
        raise UserError(f"config key 'train.min_lr' ({v['train.min_lr']:g}) is larger than "
                        f"'train.lr' ({v['train.lr']:g})")
    resume = v["train.resume"]
    if resume == "":
        raise UserError("config key 'train.resume': expected auto, never or a checkpoint path")


def flatten_toml(doc: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        if isinstance(value, dict):
            if name not in SECTION_HELP:
                raise _unknown(name, f" in {where}") if name not in FIELDS else UserError(
                    f"config key '{name}' in {where} is not a section")
            for sub, subval in value.items():
                key = f"{name}.{sub}"
                if isinstance(subval, dict):
                    raise _unknown(f"{key}.{next(iter(subval), '')}", f" in {where}")
                if key not in FIELDS:
                    raise _unknown(key, f" in {where}")
                flat[key] = subval
        else:
            if name not in FIELDS:
                raise _unknown(name, f" in {where}")
            flat[name] = value
    return flat


def read_toml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"config path is a directory, not a TOML file: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None


def load_config(path: Optional[str], overrides: Iterable[str] = ()) -> Config:
    values: dict[str, Any] = {}
    overridden = set()
    if path:
        values.update(flatten_toml(read_toml(path), path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        fld = FIELDS[resolve_key(key.strip())]
        values[fld.key] = parse_override_value(text.strip())
        overridden.add(fld.key)
    return Config(validate(values), source=path or "", given=values, overridden=overridden)


def default_config() -> Config:
    return Config(validate({}))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def dump_toml(values: dict[str, Any]) -> str:
    lines = []
    sections: dict[str, list[tuple[str, Any]]] = {}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append((name, value))
    for name, value in sections.pop("", []):
        lines.append(f"{name} = {_toml_value(value)}")
    for section, items in sections.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in items)
    return "\n".join(lines) + "\n"
