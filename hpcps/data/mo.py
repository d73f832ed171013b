"""Reading compiled gettext catalogs (``.mo``) with the standard library.

``gettext.GNUTranslations`` parses a catalog (either byte order, the charset from
its header, plural forms, ``msgctxt``); this module turns its catalog into a list
of ``Message`` and finds catalogs under a locale root laid out as
``ROOT/<lang>/LC_MESSAGES/<domain>.mo`` (``/usr/share/locale`` on Debian).

Skipped: the header entry (empty msgid), empty translations, and catalogs whose
header is still the ``msginit`` template (charset ``CHARSET``). A ``.mo`` file
has no fuzzy flags: ``msgfmt`` leaves fuzzy entries out unless run with
``--use-fuzzy``, which is as much of them as a reader can skip.

For plural entries GNUTranslations keeps the singular msgid (the English plural
msgid is dropped) with each translated form: ``Message.plural_form`` is the
form index, -1 for messages without plurals.
"""

from __future__ import annotations

import gettext
import io
import os
import struct
from dataclasses import dataclass

from hpcps.errors import UserError

CONTEXT_SEPARATOR = "\x04"     # msgctxt EOT msgid, as msgfmt stores a context


@dataclass(frozen=True)
class Message:
    msgid: str
    msgstr: str
    context: str = ""          # msgctxt, "" when none
    plural_form: int = -1      # translated form index of a plural entry, -1 otherwise
    domain: str = ""           # catalog name (the file name without .mo)


def _short_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_catalog(path: str) -> list[Message]:
    """Messages of one ``.mo`` file, in msgid order; UserError when it cannot be read."""
    domain = os.path.basename(path)
    domain = domain[:-3] if domain.endswith(".mo") else domain
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"catalog not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read catalog {path}: {_short_reason(err)}") from None
    try:
        translations = gettext.GNUTranslations(io.BytesIO(data))
    except LookupError as err:
        if "CHARSET" in str(err):
            return []                        # an untranslated msginit template
        raise UserError(f"{path} is not a readable .mo catalog ({_short_reason(err)})") from None
    except (OSError, UnicodeDecodeError, ValueError, IndexError, struct.error) as err:
        # bad magic, truncated tables, an unknown charset or a malformed Plural-Forms
        raise UserError(f"{path} is not a readable .mo catalog ({_short_reason(err)})") from None
    messages = []
    for key, msgstr in translations._catalog.items():
        if isinstance(key, tuple):
            msgid, form = key
        else:
            msgid, form = key, -1
        if msgid == "" or msgstr == "":
            continue
        context, sep, bare = msgid.partition(CONTEXT_SEPARATOR)
        if not sep:
            context, bare = "", msgid
        messages.append(Message(bare, msgstr, context, form, domain))
    messages.sort(key=lambda m: (m.msgid, m.context, m.plural_form))
    return messages


def catalog_paths(mo_root: str, lang: str) -> list[str]:
    """Sorted ``.mo`` files of ``lang`` under ``mo_root`` (empty when there are none)."""
    folder = os.path.join(mo_root, lang, "LC_MESSAGES")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith(".mo") and os.path.isfile(os.path.join(folder, name)))


def languages(mo_root: str) -> dict[str, int]:
    """lang -> number of catalogs, for every language folder under ``mo_root`` that has any."""
    check_root(mo_root)
    found = {}
    for lang in sorted(os.listdir(mo_root)):
        count = len(catalog_paths(mo_root, lang))
        if count:
            found[lang] = count
    return found


def check_root(mo_root: str) -> None:
    if not os.path.exists(mo_root):
        raise UserError(f"--mo-root {mo_root} does not exist")
    if not os.path.isdir(mo_root):
        raise UserError(f"--mo-root {mo_root} is not a directory")


def describe_languages(mo_root: str, top: int = 8) -> str:
    """'de (86), fr (87), ...': the languages with the most catalogs, for error messages."""
    found = languages(mo_root)
    if not found:
        return f"no catalogs at all under {mo_root} (expected <lang>/LC_MESSAGES/*.mo)"
    ranked = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    more = f" and {len(found) - top} more" if len(found) > top else ""
    return "catalogs found for " + ", ".join(f"{lang} ({n})" for lang, n in ranked) + more


def require_catalogs(mo_root: str, lang: str) -> list[str]:
    """The catalogs of ``lang``; UserError naming the languages that do have catalogs."""
    check_root(mo_root)
    paths = catalog_paths(mo_root, lang)
    if not paths:
        raise UserError(f"no .mo catalogs for language '{lang}' under {mo_root}; "
                        f"{describe_languages(mo_root)}")
    return paths
