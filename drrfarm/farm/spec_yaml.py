"""Reading a spec document: one YAML document through a safe loader, within limits checked before it is built.

Duplicate keys, anchors and aliases are rejected; the file size (:data:`MAX_SPEC_BYTES`), the nesting depth
(:data:`MAX_SPEC_DEPTH`), the number of values (:data:`MAX_SPEC_NODES`) and the length of number literals
(:data:`MAX_NUMBER_CHARS`) are capped. Every problem raises a ``yaml.YAMLError`` (:func:`yaml_problem` puts it
on one line) or, for the file size, a ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drrfarm.farm.validator import brief, one_line

# Limits on a spec document, checked before anything is built from it (a spec needs far less).
MAX_SPEC_BYTES = 1024 * 1024
MAX_SPEC_DEPTH = 32
MAX_SPEC_NODES = 100_000
MAX_NUMBER_CHARS = 100  # longest number literal YAML may turn into an int or float


def make_loader() -> type:
    """A safe YAML loader (libyaml's parser where available) that rejects duplicate mapping keys and over-long
    numbers, and reports any value it cannot build as a YAML error at that value's position."""
    import yaml
    from yaml.constructor import ConstructorError, SafeConstructor

    class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        """Safe loader that rejects duplicate mapping keys instead of keeping the last one."""

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep=deep)
            except yaml.YAMLError:
                raise
            except (ArithmeticError, AttributeError, IndexError, KeyError, TypeError, ValueError):
                kind = str(node.tag).rsplit(":", 1)[-1]
                shown = brief(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
                raise ConstructorError(None, None, f"cannot read {shown} as {kind[:40]}",
                                       node.start_mark) from None

    def _construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise ConstructorError(None, None, "unhashable mapping key", key_node.start_mark) from None
            if key in out:
                raise ConstructorError(None, None, f"duplicate key {brief(key)}", key_node.start_mark)
            out[key] = loader.construct_object(value_node, deep=deep)
        return out

    def _number_constructor(construct: Any) -> Any:
        def _construct_number(loader: Any, node: Any) -> Any:
            text = loader.construct_scalar(node)
            if len(text) > MAX_NUMBER_CHARS:
                raise ConstructorError(None, None, f"a number of {len(text)} characters is too long "
                                                   f"(at most {MAX_NUMBER_CHARS})", node.start_mark)
            return construct(loader, node)

        return _construct_number

    _UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _number_constructor(SafeConstructor.construct_yaml_int))
    _UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float",
                                     _number_constructor(SafeConstructor.construct_yaml_float))
    return _UniqueKeyLoader


def check_yaml_shape(text: str, loader_class: type) -> None:
    """Reject anchors and aliases, nesting deeper than ``MAX_SPEC_DEPTH`` and more than ``MAX_SPEC_NODES`` values
    from the parser's events alone, before any value is built (a few nested aliases expand to gigabytes)."""
    import yaml
    from yaml.composer import ComposerError

    loader = loader_class(text)
    depth = nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in a spec",
                                    event.start_mark)
            if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                nodes += 1
                if nodes > MAX_SPEC_NODES:
                    raise ComposerError(None, None, f"more than {MAX_SPEC_NODES} values; give long lists (such as "
                                                    "pose matrices) as a file", event.start_mark)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_SPEC_DEPTH:
                    raise ComposerError(None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels", event.start_mark)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def parse_yaml(text: str) -> Any:
    """One YAML document, within the limits above; every problem raises a ``yaml.YAMLError``."""
    import yaml

    loader_class = make_loader()
    check_yaml_shape(text, loader_class)
    return yaml.load(text, Loader=loader_class)  # noqa: S506 - a safe loader subclass


def yaml_problem(exc: Exception) -> str:
    """`` (line L, column C): problem`` of a YAML error, on one line and bounded."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}: {one_line(problem)}"


def read_limited(p: Path, limit: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of ``p``; ValueError (not reading further) when it is larger than ``limit`` bytes."""
    with p.open("rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"file is larger than {limit // 1024} KiB")
    return raw.decode("utf-8")
