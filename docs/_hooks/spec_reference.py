"""MkDocs hook: the sweep spec reference, generated from ``jobs/specs/example.yaml`` at build time.

``docs/reference/spec.md`` holds the hand-written parts of the page and the line ``MARKER``; the hook
replaces that line with one table per section of the example spec (every key, commented-out alternatives
included, with its full path, the example's value and the example's comment) followed by the section's
lines of the example, and ``SIZES_MARKER`` with the size keys of the built-in tools (read from the
signatures of their generators in ``drrfarm/meshes.py``). Nothing is imported from drrfarm: the build
only reads files.

``python docs/_hooks/spec_reference.py`` prints the generated page.
"""

from __future__ import annotations

import ast
import contextlib
import html
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "jobs" / "specs" / "example.yaml"
MESHES = ROOT / "drrfarm" / "meshes.py"
PAGE = "reference/spec.md"
MARKER = "<!-- spec-keys: generated from jobs/specs/example.yaml -->"
SIZES_MARKER = "<!-- tool-sizes: generated from drrfarm/meshes.py -->"

# Built-in tools (``tools[].mesh``) and their generators; arguments set by other keys are not size keys
# (drrfarm.meshes.BUILTIN_TOOLS and drrfarm.farm.spec_scene._NOT_SHAPE).
BUILTIN_GENERATORS = {"kwire": "kwire_mesh", "screw": "screw_mesh", "cylinder": "cylinder_mesh"}
NOT_SIZE = {"material", "density_g_cm3", "mode", "name"}

_KEY_RE = re.compile(r"^(?P<dash>-\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:\s+(?P<rest>.*))?$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Key:
    """One key of the example spec."""

    path: str  # dotted, list items as "[]": "volumes[].materials.thresholds_hu"
    value: str = ""  # the example's value as written ("" when the key holds a block)
    descriptions: list[str] = field(default_factory=list)  # the comments of its lines
    commented: bool = False  # only in commented-out lines of the example
    line: int = 0
    notes: list[str] = field(default_factory=list)  # comment lines inside its block
    alternatives: list[str] = field(default_factory=list)  # comments of commented-out lines of an active key

    @property
    def text(self) -> str:
        """Its comments, in the order a reader of the example meets them."""
        parts = [*self.descriptions, *self.notes]
        text = " ".join(p if p.endswith(".") or i == len(parts) - 1 else p + "." for i, p in enumerate(parts))
        if self.alternatives:
            lead = text + (" " if text.endswith(".") else ". ") if text else ""
            text = lead + "Commented-out example: " + " ".join(self.alternatives)
        return text

    @property
    def section(self) -> str:
        return re.split(r"[.\[]", self.path, maxsplit=1)[0]

    @property
    def name(self) -> str:
        return re.split(r"\.|\[\]\.?", self.path)[-1] or self.path


@dataclass
class _Line:
    """A key line being parsed: where its comment goes."""

    key: Key
    desc: list[str]
    indent: int
    commented: bool = False


def _split_comment(text: str) -> tuple[str, str | None]:
    """``value  # comment`` -> (value, comment text after '#'); '#' inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:]
    return text.rstrip(), None


def _flow_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_continuation(comment: str) -> bool:
    """A comment that continues the previous key's (the example indents continuations by 3 spaces)."""
    return comment.startswith("   ")


def _unbalanced(text: str) -> bool:
    return text.count("(") > text.count(")")


def parse_example(text: str) -> list[Key]:
    """Every key of the example spec, in order of first appearance, duplicates merged.

    Commented-out keys (``# key: value`` at a key's indentation) are keys too. A comment continues the
    previous key's comment when it starts with three spaces or that comment has an unclosed "(";
    comment-only lines at a key's indentation describe the block that holds them.
    """
    keys: dict[str, Key] = {}
    stack: list[tuple[int, str]] = []  # (indent of the children, path) of the open blocks
    described: _Line | None = None  # the last key line with a comment of its own
    lines: list[_Line] = []
    prose: tuple[str, int] | None = None  # (owner path, its description index) of the last prose line

    def parent(indent: int) -> str:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        return stack[-1][1] if stack else ""

    def add(path: str, value: str, lineno: int, commented: bool) -> Key:
        k = keys.get(path)
        if k is None:
            k = keys[path] = Key(path, value, [], commented, lineno)
        elif not commented:
            k.value = k.value or value
            k.commented = False
        return k

    def add_flow(path: str, flow: Any, lineno: int, commented: bool) -> None:
        if isinstance(flow, dict) and all(isinstance(c, str) and _IDENT_RE.match(c) for c in flow):
            for c, v in flow.items():
                add(f"{path}.{c}", _flow_value(v), lineno, commented)
                add_flow(f"{path}.{c}", v, lineno, commented)

    def describe(line: _Line | None, comment: str | None) -> None:
        nonlocal described
        if comment is None or not comment.strip():
            return
        text = comment.strip()
        prev = described
        if prev is not None and (_is_continuation(comment) or _unbalanced(" ".join(prev.desc))):
            prev.desc.append(text)
            if line is not None and line is not prev and not line.desc and not line.commented:
                line.desc.append(f"see `{prev.key.path}`")
            return
        if line is not None:
            line.desc.append(text)
            described = line

    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        body = raw.strip()
        commented = body.startswith("#")
        if commented:
            if not lines:
                continue  # the file's header
            inner = raw[indent + 1:]
            body = inner.strip()
            if indent > lines[-1].indent + 4:  # in the comment column: continues the comment above
                describe(None, inner)
                continue
            indent += max(len(inner) - len(inner.lstrip(" ")) - 1, 0)
            if body.startswith("# or:"):  # "#   # or: file: poses.npy": an alternative to its sibling
                body = body[len("# or:"):].strip()
        m = _KEY_RE.match(body)
        if m is None:
            if body.startswith("- {") and not commented:  # a list item written as a flow mapping
                value, comment = _split_comment(body[1:].strip())
                add_flow(f"{parent(indent)}[]", yaml.safe_load(value), lineno, False)
                describe(None, comment)
            elif commented and not body.startswith("-"):
                # prose between keys: it describes the block that holds it
                owner = parent(indent)
                if owner in keys:
                    k = keys[owner]
                    if prose is not None and prose[0] == owner:
                        k.notes[prose[1]] += " " + body
                    else:
                        k.notes.append(body)
                        prose = (owner, len(k.notes) - 1)
                    described = None
                    continue
            prose = None
            continue
        prose = None
        owner = parent(indent)
        key_indent = indent
        if m.group("dash"):
            owner = f"{owner}[]"
            key_indent = indent + len(m.group("dash"))
            stack.append((key_indent - 1, owner))
        path = f"{owner}.{m.group('key')}" if owner else m.group("key")
        value, comment = _split_comment(m.group("rest") or "")
        k = add(path, value, lineno, commented)
        if value.startswith("{"):
            with contextlib.suppress(yaml.YAMLError):
                add_flow(path, yaml.safe_load(value), lineno, commented)
        stack.append((key_indent, path))
        line = _Line(k, [], key_indent, commented)
        lines.append(line)
        describe(line, comment)
    for line in lines:
        if line.desc:
            d = " ".join(line.desc)
            target = line.key.alternatives if line.commented and not line.key.commented else line.key.descriptions
            if d not in target:
                target.append(d)
    return list(keys.values())


def _md_text(text: str) -> str:
    """Comment text for a table cell: code spans kept, HTML and Markdown specials escaped elsewhere."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.replace("|", "\\|"))
        else:
            part = html.escape(part, quote=False)
            out.append(re.sub(r"([\\|*_\[\]])", r"\\\1", part))
    return "".join(out)


def _code(text: str) -> str:
    """A code span for a table cell."""
    if not text:
        return ""
    tick = "``" if "`" in text else "`"
    pad = " " if tick == "``" else ""
    return f"{tick}{pad}{text}{pad}{tick}"


def _sections(text: str) -> list[tuple[str, int, int]]:
    """(top-level key, first line, last line) of each top-level key of the example."""
    lines = text.splitlines()
    starts = [(i + 1, m.group(1)) for i, ln in enumerate(lines) if (m := re.match(r"^([A-Za-z_]\w*):", ln))]
    out = []
    for n, (start, name) in enumerate(starts):
        end = starts[n + 1][0] - 1 if n + 1 < len(starts) else len(lines)
        while end > start and not lines[end - 1].strip():
            end -= 1
        out.append((name, start, end))
    return out


def _table(keys: list[Key]) -> list[str]:
    rows = ["| key | example | comment in the example |", "|---|---|---|"]
    for k in keys:
        note = _md_text(k.text)
        if k.commented:
            note = f"*(commented out in the example)* {note}".rstrip()
        rows.append(f"| {_code(k.path)} | {_code(k.value)} | {note} |")
    return rows


def spec_keys_markdown(text: str | None = None) -> str:
    """The generated part of the spec reference page."""
    text = EXAMPLE.read_text(encoding="utf-8") if text is None else text
    keys = parse_example(text)
    lines = text.splitlines()
    sections = _sections(text)
    out: list[str] = []
    scalars = [k for k in keys if "." not in k.path and "[" not in k.path
               and not any(o.section == k.path and o is not k for o in keys)]
    if scalars:
        out += ["## Top-level settings", "", *_table(scalars), ""]
    for name, start, end in sections:
        if any(k.path == name for k in scalars):
            continue
        section_keys = [k for k in keys if k.section == name]
        out += [f"## `{name}`", "", *_table(section_keys), ""]
        out += [f'??? example "`jobs/specs/example.yaml`, lines {start}–{end}"', "", "    ```yaml"]
        out += [f"    {ln}".rstrip() for ln in lines[start - 1:end]]
        out += ["    ```", ""]
    return "\n".join(out).rstrip() + "\n"


def tool_sizes() -> dict[str, list[tuple[str, str]]]:
    """Built-in tool -> [(size key, default or "required")], from the generators' signatures."""
    tree = ast.parse(MESHES.read_text(encoding="utf-8"))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    out = {}
    for tool, gen in BUILTIN_GENERATORS.items():
        args = funcs[gen].args
        names = [a.arg for a in args.args]
        defaults = [None] * (len(names) - len(args.defaults)) + list(args.defaults)
        out[tool] = [(n, "required" if d is None else ast.unparse(d))
                     for n, d in zip(names, defaults, strict=True) if n not in NOT_SIZE]
    return out


def tool_sizes_markdown() -> str:
    rows = ["| `mesh` | `size` keys (default) |", "|---|---|"]
    for tool, sizes in tool_sizes().items():
        rows.append(f"| `{tool}` | " + ", ".join(f"`{n}` ({d})" for n, d in sizes) + " |")
    return "\n".join(rows) + "\n"


def render_page(markdown: str) -> str:
    """The page with its markers replaced by the generated parts."""
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker line {MARKER!r}")
    markdown = markdown.replace(MARKER, spec_keys_markdown())
    return markdown.replace(SIZES_MARKER, tool_sizes_markdown())


# ------------------------------------------------------------------------------------------ MkDocs hooks


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if page.file.src_uri == PAGE:
        return render_page(markdown)
    return markdown


if __name__ == "__main__":
    sys.stdout.write(render_page((ROOT / "docs" / PAGE).read_text(encoding="utf-8")))
