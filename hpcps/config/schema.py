"""The one configuration schema: it drives TOML loading, ``key=value`` overrides,
validation, the resolved-config file and docs/configuration.md.

The sections are defined in ``fields_*.py`` (each imports only ``fields``);
importing them here fills ``FIELDS`` and ``SECTION_HELP`` in definition order,
which is the order of docs/configuration.md.
"""

from hpcps.config import fields_core, fields_embed_rnn, fields_ps, fields_transformers  # noqa: F401
from hpcps.config.fields import AUTO, FIELDS, SECTION_HELP, Field

__all__ = ["AUTO", "FIELDS", "SECTION_HELP", "Field"]
