"""Griffe extension for the API pages (loaded by mkdocstrings, see mkdocs.yml): reST roles as links.

drrfarm's docstrings name other objects with reST roles (``:class:`drrfarm.physics.Physics```,
``:func:`get_backend```, ``:meth:`~Mesh.aligned```); rendered as Markdown they would read ":class:"
followed by code. This extension rewrites each role into the object's name in code, linked to its entry
in the API pages where it has one: names are resolved in the scope of the docstring's object, as Python
would, and the links are optional cross-references (an object without an entry gives plain code, not a
warning). It also escapes ``][`` outside code, which Markdown would read as a reference link (as in
``rows[i]['image_scale']``), and turns reST's ``text::`` before a literal block into ``text:``.

Only the docstrings as rendered change; the source is read, never written.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import griffe

PACKAGE = "drrfarm"
_ROLE_RE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+?)`")
_CODE_RE = re.compile(r"(`+)(?:.+?)\1", re.DOTALL)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` as named in ``obj``'s docstring, or None."""
    if target == PACKAGE or target.startswith(PACKAGE + "."):
        return target
    head, _, rest = target.partition(".")
    try:
        full = obj.resolve(head)
    except Exception:  # griffe raises NameResolutionError, or others for odd names; either way: no link
        return None
    return f"{full}.{rest}" if rest else full


def _role(obj: griffe.Object, match: re.Match[str]) -> str:
    target = match["target"].strip()
    name = target.removesuffix("()")
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else target
    full = _resolve(obj, name)
    code = f"<code>{html.escape(shown)}</code>"
    if full is None:
        return code
    return f'<autoref identifier="{html.escape(full)}" optional>{code}</autoref>'


def _escape_refs(text: str) -> str:
    """``][`` outside code spans, escaped so that Markdown does not read a reference link."""
    out, pos = [], 0
    for m in _CODE_RE.finditer(text):
        out.append(text[pos:m.start()].replace("][", "]\\["))
        out.append(m.group(0))
        pos = m.end()
    out.append(text[pos:].replace("][", "]\\["))
    return "".join(out)


def _literal_markers(text: str) -> str:
    """reST's ``text::`` before an indented block reads ``text:`` (the block is Markdown code as it is)."""
    text = re.sub(r"(?m)^[ \t]*::[ \t]*\n(?=[ \t]*\n)", "", text)
    return re.sub(r"(?m)(\S)[ \t]*::[ \t]*$(?=\n[ \t]*\n)", r"\1:", text)


def rewrite(text: str, obj: griffe.Object) -> str:
    """A docstring with its roles as (optional) links and stray reference-link syntax escaped."""
    return _escape_refs(_literal_markers(_ROLE_RE.sub(lambda m: _role(obj, m), text)))


class ReSTRoles(griffe.Extension):
    """Rewrites the docstrings of the drrfarm package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)
