"""The sweep spec's validator primitives: typed values read at a key path, with one-line messages.

:class:`Validator` checks one value at a time -- a mapping with its allowed and required keys, a number in
a range, an integer, a string, a choice, a list, a 3-vector, a matrix, a number axis (:class:`AxisSpec`:
fixed values, a grid, a uniform or a normal draw), a path or URL resolved against the spec's folder -- and
raises :class:`~drrfarm.errors.SpecError` naming the file, the key path (``poses.carm.alpha_deg.range[1]``)
and the reason, showing user values only in short (:func:`brief`). The sections of a spec are validated by
:mod:`drrfarm.farm.spec` and :mod:`drrfarm.farm.spec_scene` on top of these.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from drrfarm.errors import SpecError

SAMPLE_RE = re.compile(r"^sample:([a-z][a-z0-9_]*)$")
URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PLAIN_KEY_RE = re.compile(r"[!-~]{1,64}")  # printable ASCII without spaces: shown as is in key paths


@dataclass(frozen=True)
class AxisSpec:
    """One pose parameter: fixed values (a grid axis) or a random distribution.

    ``kind`` is ``"values"`` (``values`` holds the grid points), ``"uniform"`` (``low``, ``high``)
    or ``"normal"`` (``mean``, ``std``, optional ``clip``).
    """

    kind: str
    values: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    clip: tuple[float, float] | None = None

    @property
    def is_random(self) -> bool:
        return self.kind != "values"

    def describe(self) -> str:
        if self.kind == "values":
            if len(self.values) == 1:
                return f"{self.values[0]:g}"
            return f"{len(self.values)} values [{min(self.values):g}..{max(self.values):g}]"
        if self.kind == "uniform":
            return f"uniform[{self.low:g}, {self.high:g}]"
        clip = f" clipped to [{self.clip[0]:g}, {self.clip[1]:g}]" if self.clip else ""
        return f"normal(mean {self.mean:g}, std {self.std:g}){clip}"

    def content(self) -> dict[str, Any]:
        if self.kind == "values":
            return {"values": list(self.values)}
        if self.kind == "uniform":
            return {"uniform": [self.low, self.high]}
        return {"normal": {"mean": self.mean, "std": self.std,
                           "clip": list(self.clip) if self.clip else None}}


def join(path: str, key: str | int) -> str:
    """The key path of ``key`` (a mapping key or a list index) under ``path``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _PLAIN_KEY_RE.fullmatch(key):
        key = brief(key, 40)
    return f"{path}.{key}" if path else key


def typename(value: Any) -> str:
    """The YAML name of a value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)


_BRIEF_REPR = reprlib.Repr()
_BRIEF_REPR.maxlevel = 2
_BRIEF_REPR.maxlist = _BRIEF_REPR.maxtuple = _BRIEF_REPR.maxdict = 6
_BRIEF_REPR.maxset = _BRIEF_REPR.maxfrozenset = 6
_BRIEF_REPR.maxstring = _BRIEF_REPR.maxother = 80
_BRIEF_REPR.maxlong = 40


def brief(value: Any, limit: int = 80) -> str:
    """A short repr of a user value for an error message, never built from the full repr of a large value."""
    if isinstance(value, int) and value.bit_length() > 1024:
        return f"<integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:limit])
    try:
        text = _BRIEF_REPR.repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{typename(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (line breaks become spaces), cut to ``limit`` characters."""
    flat = " ".join(text[: limit + 1].splitlines())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def key_text(key: Any) -> str:
    """A mapping key as a key path part (non-string keys shown briefly)."""
    return key if isinstance(key, str) else brief(key, 40)


def relpath(p: Path) -> str | None:
    """``p`` relative to the current directory, or None when it lies outside it."""
    try:
        rel = os.path.relpath(p, Path.cwd())
    except ValueError:
        return None
    return None if rel.startswith("..") else rel


class Validator:
    """Reads the values of one spec document (``source``: its file, for messages; ``base_dir``: where its
    relative paths start)."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    # -- primitives --------------------------------------------------------------------------
    def fail(self, path: str, reason: str) -> NoReturn:
        raise SpecError(f"{self.source}: {one_line(path or '<top level>', 300)}: {one_line(reason)}")

    def mapping(self, value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()
                ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {typename(value)} {brief(value)}")
        allowed = list(allowed)
        for key in value:
            if not isinstance(key, str):
                self.fail(join(path, key_text(key)), f"keys must be strings, got {typename(key)} {brief(key)}")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (allowed: {', '.join(allowed)})"
                self.fail(join(path, key), f"unknown key{hint}")
        for key in required:
            if key not in value:
                self.fail(join(path, key), "required key is missing")
        return value

    def number(self, value: Any, path: str, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
                hint = " (YAML reads exponent numbers without a '.' as text; write e.g. 1.0e3)"
            self.fail(path, f"must be a number, got {typename(value)} {brief(value)}{hint}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            self.fail(path, f"must be finite, got {brief(value)}")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            self.fail(path, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        if hi is not None and (x > hi or (hi_open and x == hi)):
            self.fail(path, f"must be {'<' if hi_open else '<='} {hi:g}, got {value:g}")
        return x

    def integer(self, value: Any, path: str, *, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {typename(value)} {brief(value)}")
        if lo is not None and value < lo:
            self.fail(path, f"must be >= {lo}, got {brief(value)}")
        if hi is not None and value > hi:
            self.fail(path, f"must be <= {hi}, got {brief(value)}")
        return int(value)

    def string(self, value: Any, path: str, *, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {typename(value)} {brief(value)}")
        if nonempty and not value.strip():
            self.fail(path, "must not be empty")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {typename(value)} {brief(value)}")
        return value

    def choice(self, value: Any, path: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        s = self.string(value, path)
        if s not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}; got {brief(s)}")
        return s

    def seq(self, value: Any, path: str, *, min_len: int = 1, max_len: int | None = None) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {typename(value)} {brief(value)}")
        if len(value) < min_len:
            self.fail(path, f"must have at least {min_len} item{'s' if min_len != 1 else ''}")
        if max_len is not None and len(value) > max_len:
            self.fail(path, f"must have at most {max_len} items, got {len(value)}")
        return value

    def vec3(self, value: Any, path: str, *, lo: float | None = None) -> tuple[float, float, float]:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = self.number(value, path, lo=lo)
            return (x, x, x)
        items = self.seq(value, path, min_len=3, max_len=3)
        a, b, c = (self.number(x, join(path, i), lo=lo) for i, x in enumerate(items))
        return (a, b, c)

    def matrix(self, value: Any, path: str, n_rows: int, n_cols: int) -> list[float]:
        """A matrix as nested rows or ``n_rows * n_cols`` numbers; returned flat, row-major."""
        if isinstance(value, list) and len(value) == n_rows * n_cols and not any(isinstance(x, list) for x in value):
            return [self.number(x, join(path, k)) for k, x in enumerate(value)]
        rows = self.seq(value, path, min_len=n_rows, max_len=n_rows)
        flat: list[float] = []
        for r, row in enumerate(rows):
            rr = self.seq(row, join(path, r), min_len=n_cols, max_len=n_cols)
            flat.extend(self.number(x, join(join(path, r), c)) for c, x in enumerate(rr))
        return flat

    def as_list(self, value: Any) -> list[Any]:
        return value if isinstance(value, list) else [value]

    def resolve_path(self, text: str) -> tuple[str, str | None]:
        """(resolved path/URL, path relative to cwd or None) of a volume-ish input."""
        if SAMPLE_RE.match(text) or URL_RE.match(text):
            if text.startswith("file://"):
                local = text[len("file://"):]
                p = Path(local) if os.path.isabs(local) else self.base_dir / local
                return str(p.resolve()), relpath(p)
            return text, None
        p = Path(os.path.expanduser(text))
        if not p.is_absolute():
            p = self.base_dir / p
        p = Path(os.path.normpath(p))
        return str(p), relpath(p)

    def number_pair(self, value: Any, path: str, **kw: Any) -> tuple[float, float]:
        """``[a, b]``: exactly two numbers (``kw``: :meth:`number`'s bounds on each)."""
        pair = self.seq(value, path, min_len=2, max_len=2)
        return self.number(pair[0], join(path, 0), **kw), self.number(pair[1], join(path, 1), **kw)

    def bounds(self, value: Any, path: str, **kw: Any) -> tuple[float, float]:
        """``[lower, upper]`` with upper > lower (``kw``: :meth:`number`'s bounds on each)."""
        a, b = self.number_pair(value, path, **kw)
        if b <= a:
            self.fail(join(path, 1), f"upper bound {b:g} must exceed lower bound {a:g}")
        return a, b

    def axis(self, value: Any, path: str, *, lo: float | None = None, lo_open: bool = False) -> AxisSpec:
        kw = {"lo": lo, "lo_open": lo_open}
        if isinstance(value, list):
            items = self.seq(value, path)
            vals = tuple(self.number(x, join(path, i), **kw) for i, x in enumerate(items))
            if len(set(vals)) != len(vals):
                self.fail(path, "grid values must be distinct")
            return AxisSpec("values", vals)
        if not isinstance(value, dict):
            return AxisSpec("values", (self.number(value, path, **kw),))
        m = self.mapping(value, path, ["values", "range", "num", "step", "uniform", "normal"])
        kinds = [k for k in ("values", "range", "uniform", "normal") if k in m]
        if len(kinds) != 1:
            self.fail(path, "give exactly one of values, range (with num or step), uniform, normal")
        kind = kinds[0]
        if kind != "range":
            for extra in ("num", "step"):
                if extra in m:
                    self.fail(join(path, extra), "only allowed with 'range'")
        if kind == "values":
            return self.axis(self.seq(m["values"], join(path, "values")), join(path, "values"), **kw)
        if kind == "range":
            rp = join(path, "range")
            a, b = self.number_pair(m["range"], rp, **kw)
            if b < a:
                self.fail(join(rp, 1), f"range end {b:g} is below its start {a:g}")
            if not math.isfinite(b - a):
                self.fail(rp, f"range [{a:g}, {b:g}] is too wide")
            if ("num" in m) == ("step" in m):
                self.fail(path, "a range needs exactly one of num or step")
            if "num" in m:
                n = self.integer(m["num"], join(path, "num"), lo=1, hi=1_000_000)
                if n == 1:
                    if a != b:
                        self.fail(join(path, "num"), "num: 1 needs range [x, x]; use a fixed value instead")
                    return AxisSpec("values", (a,))
                if a == b:
                    self.fail(join(rp, 1), f"an empty range [{a:g}, {b:g}] cannot hold {n} distinct values")
                vals = tuple(float(a + (b - a) * k / (n - 1)) for k in range(n))
                return AxisSpec("values", vals)
            step = self.number(m["step"], join(path, "step"), lo=0.0, lo_open=True)
            n = int(math.floor((b - a) / step + 1e-9)) + 1
            if n > 1_000_000:
                self.fail(join(path, "step"), f"gives {n} values; at most 1000000")
            return AxisSpec("values", tuple(float(a + k * step) for k in range(n)))
        if kind == "uniform":
            up = join(path, "uniform")
            a, b = self.bounds(m["uniform"], up, **kw)
            if not math.isfinite(b - a):
                self.fail(up, f"range [{a:g}, {b:g}] is too wide")
            return AxisSpec("uniform", low=a, high=b)
        np_ = join(path, "normal")
        nm = self.mapping(m["normal"], np_, ["mean", "std", "clip"], required=["mean", "std"])
        mean = self.number(nm["mean"], join(np_, "mean"))
        std = self.number(nm["std"], join(np_, "std"), lo=0.0, lo_open=True)
        clip = None
        if "clip" in nm:
            clip = self.bounds(nm["clip"], join(np_, "clip"), **kw)
        elif lo is not None:
            self.fail(join(np_, "clip"), f"required for this parameter (values must stay {'>' if lo_open else '>='} "
                                         f"{lo:g}); e.g. clip: [{max(lo, mean - 3 * std):g}, {mean + 3 * std:g}]")
        return AxisSpec("normal", mean=mean, std=std, clip=clip)
