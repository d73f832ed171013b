"""docs/configuration.md, generated from the schema so the reference never drifts.

    python -m hpcps.config.reference > docs/configuration.md

``tests/test_config.py`` fails when the committed file differs from this output.
"""

from __future__ import annotations

from hpcps.config.schema import AUTO, FIELDS, SECTION_HELP, Field

HEADER = """# Configuration reference

Generated from the schema (`hpcps/config/fields_*.py`, assembled by
`hpcps/config/schema.py`) by `python -m hpcps.config.reference`; do not edit by hand.

A run is configured by a TOML file plus `key=value` overrides on the command line,
applied in that order:

    mpirun -n 3 python -m mpi4py -m hpcps train configs/default.toml train.lr=1e-3 ps.mode=asp

Keys are `section.name` (top-level keys have no section). An unknown key, a value of
the wrong type, a value outside its range or not among its choices is an error
(one line, exit 2) that names the key. The resolved configuration is written to
`OUT_DIR/config.toml` and into every checkpoint's manifest.
"""


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _allowed(f: Field) -> str:
    if f.choices:
        return " \\| ".join(f"`{c}`" for c in f.choices)
    parts = []
    if f.kind == "int_or_auto":
        parts.append(f"`{AUTO}` or an integer")
    if f.min is not None:
        parts.append(f"{'>' if f.min_exclusive else '≥'} {f.min:g}")
    if f.max is not None:
        parts.append(f"≤ {f.max:g}")
    return ", ".join(parts)


def render_markdown() -> str:
    lines = [HEADER]
    sections = sorted({f.section for f in FIELDS.values()}, key=lambda s: (s != "", s))
    order = list(SECTION_HELP)  # the schema's own order where it has one
    sections.sort(key=lambda s: order.index(s) if s in order else len(order))
    for name in sections:
        lines.append(f"## `[{name}]`" if name else "## Top level")
        lines.append("")
        if SECTION_HELP.get(name):
            lines.append(SECTION_HELP[name])
            lines.append("")
        lines.append("| key | type | default | allowed | meaning |")
        lines.append("|---|---|---|---|---|")
        for f in FIELDS.values():
            if f.section != name:
                continue
            help_text = f.help.replace("|", "\\|")
            lines.append(f"| `{f.key}` | {f.kind.replace('_', ' ')} | `{_value(f.default)}` | "
                         f"{_allowed(f)} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
