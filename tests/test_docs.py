"""The documentation site: its worked examples run, the spec reference lists every key, the site is complete.

The site itself is built by `mkdocs build --strict` (CI, with the `docs` extra); these tests need only the
test environment.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.md"))
SPEC_SOURCES = (ROOT / "drrfarm" / "farm" / "spec.py", ROOT / "drrfarm" / "farm" / "spec_scene.py",
                ROOT / "drrfarm" / "farm" / "validator.py")

_PYTHON_BLOCK_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _load_hook(name: str) -> ModuleType:
    path = DOCS / "_hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"drrfarm_docs_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of a Markdown page."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _PYTHON_BLOCK_RE.finditer(text)]


# ------------------------------------------------------------------------------------------ worked examples


def _example_params() -> list[object]:
    return [pytest.param(page, id=page.stem) for page in EXAMPLES if page.name != "index.md"]


def test_every_example_page_has_code_and_is_in_the_index() -> None:
    index = (DOCS / "examples" / "index.md").read_text(encoding="utf-8")
    pages = [p for p in EXAMPLES if p.name != "index.md"]
    assert pages, "docs/examples/ has no example pages"
    for page in pages:
        assert python_blocks(page), f"{page.relative_to(ROOT)} has no ```python block to run"
        assert f"]({page.name})" in index, f"docs/examples/index.md does not link {page.name}"


@pytest.mark.parametrize("page", _example_params())
def test_worked_example_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the page, in order, in one namespace, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_example_{page.stem.replace('-', '_')}"}
    try:
        for line, code in python_blocks(page):
            compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(compiled, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------------------ spec reference


def schema_keys() -> set[str]:
    """Every key the spec validator accepts: the literal key lists of its ``mapping(...)`` calls."""
    keys: set[str] = set()
    for path in SPEC_SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants: dict[str, list[str]] = {}
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, (ast.Tuple, ast.List))):
                constants[node.targets[0].id] = [e.value for e in node.value.elts
                                                 if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or getattr(node.func, "attr", None) != "mapping":
                continue
            allowed = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "allowed"), None)
            if not isinstance(allowed, (ast.List, ast.Tuple)):
                continue  # computed lists (built-in tool sizes) are checked separately
            for elt in allowed.elts:
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                    keys.add(elt.value)
                elif isinstance(elt, ast.Starred) and isinstance(elt.value, ast.Name):
                    keys.update(constants[elt.value.id])
    return keys


def test_schema_extraction_sees_the_whole_schema() -> None:
    keys = schema_keys()
    for key in ("volumes", "thresholds_hu", "alpha_deg", "uniform", "clip", "tip_jitter_mm", "tool_tips",
                "scatter", "image_dtype", "shard_timeout_floor_s", "max_actors"):
        assert key in keys, f"{key!r} not found in the spec validator's key lists"
    assert len(keys) > 80


@pytest.fixture(scope="module")
def spec_page() -> str:
    hook = _load_hook("spec_reference")
    return hook.render_page((DOCS / hook.PAGE).read_text(encoding="utf-8"))


def test_spec_reference_documents_every_schema_key(spec_page: str) -> None:
    spans = set(re.findall(r"`([^`\n]+)`", spec_page))
    missing = sorted(k for k in schema_keys()
                     if not any(s == k or s.endswith(("." + k, "[]." + k)) for s in spans))
    assert not missing, f"docs/reference/spec.md (generated from jobs/specs/example.yaml) lacks {missing}"


def test_spec_reference_rows_are_schema_keys() -> None:
    """Every key the generated tables show from the example is one the validator accepts."""
    hook = _load_hook("spec_reference")
    keys = hook.parse_example(hook.EXAMPLE.read_text(encoding="utf-8"))
    sizes = {n for params in hook.tool_sizes().values() for n, _ in params}
    known = schema_keys() | sizes
    assert len(keys) > 80
    unknown = [k.path for k in keys if k.name not in known]
    assert not unknown, f"keys in jobs/specs/example.yaml that the spec validator rejects: {unknown}"
    sections = {k.section for k in keys}
    assert {"volumes", "poses", "spectra", "detector", "image", "tools", "output", "farm"} <= sections


def test_spec_reference_every_example_line_is_shown(spec_page: str) -> None:
    text = (ROOT / "jobs" / "specs" / "example.yaml").read_text(encoding="utf-8")
    body = [ln for ln in text.splitlines() if ln.strip()]
    first_key = next(i for i, ln in enumerate(body) if re.match(r"^[A-Za-z_]\w*:", ln))
    shown = {ln.strip() for ln in spec_page.splitlines()}
    for ln in body[first_key:]:
        if re.match(r"^[A-Za-z_]\w*:\s+\S", ln) and not ln.split("#")[0].rstrip().endswith(":"):
            continue  # top-level scalars are table rows, not excerpts
        assert ln.strip() in shown, f"example.yaml line not on the spec reference page: {ln!r}"


def test_spec_reference_tool_sizes_match_the_validator() -> None:
    from drrfarm.farm.spec_scene import _NOT_SHAPE
    from drrfarm.meshes import BUILTIN_TOOLS

    hook = _load_hook("spec_reference")
    assert set(hook.BUILTIN_GENERATORS) == set(BUILTIN_TOOLS)
    assert set(_NOT_SHAPE) == hook.NOT_SIZE
    for tool, params in hook.tool_sizes().items():
        expected = [a for a in inspect.signature(BUILTIN_TOOLS[tool]).parameters if a not in _NOT_SHAPE]
        assert [n for n, _ in params] == expected, tool


def test_spec_reference_parses_commented_and_flow_keys() -> None:
    hook = _load_hook("spec_reference")
    keys = {k.path: k for k in hook.parse_example("""\
# header
top:                  # a section
  - id: a             # first
    opts: {x: 1, y: [2, 3]}
    long: 5           # starts (here
                      #   and continues)
    more: 6           #   still "long"
    # alt:            # commented out
    #   inner: 1
  # Prose about the items.
after: 3
""")}
    assert list(keys) == ["top", "top[].id", "top[].opts", "top[].opts.x", "top[].opts.y", "top[].long",
                          "top[].more", "top[].alt", "top[].alt.inner", "after"]
    assert keys["top[].opts.y"].value == "[2, 3]"
    assert keys["top[].alt"].commented and keys["top[].alt.inner"].commented and not keys["top[].id"].commented
    assert keys["top[].long"].text == 'starts (here and continues) still "long"'
    assert keys["top[].more"].text == "see `top[].long`"
    assert keys["top[].alt"].text == "commented out"
    assert keys["top"].text == "a section. Prose about the items."
    assert keys["after"].text == ""


# ------------------------------------------------------------------------------------------ site structure


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_mkdocs_nav_covers_every_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs" and config["strict"] is True
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
    assert sorted(nav) == pages
    for guide in ("geometry.md", "scatter.md", "scaling.md", "training.md"):  # README links these paths
        assert guide in nav


def test_mkdocs_builds_offline() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["theme"]["font"] is False  # no web fonts
    plugins = [p if isinstance(p, str) else next(iter(p)) for p in config["plugins"]]
    assert not {"social", "privacy"} & set(plugins)  # these download at build time
    python = next(p for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    handler = python["mkdocstrings"]["handlers"]["python"]
    assert not handler.get("inventories") and not handler.get("import")  # nothing fetched at build time


def test_api_reference_pages_render_the_public_modules() -> None:
    api = {p.stem: p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md")}
    assert re.search(r"^::: drrfarm$", api["index"], re.M)
    for module in ("geometry", "physics", "spectrum", "volume", "materials", "render", "data", "sinks"):
        assert re.search(rf"^::: drrfarm\.{module}$", api[module], re.M), module
    assert re.search(r"^::: drrfarm\.farm\.spec$", api["farm"], re.M)


def test_docs_extra_is_pinned_and_readme_says_how_to_build() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]["docs"]
    names = {re.split(r"[\[<>=]", r, maxsplit=1)[0] for r in extra}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"} <= names
    constraints = (ROOT / "infra" / "docker" / "constraints.txt").read_text(encoding="utf-8")
    for name in names:
        assert re.search(rf"(?m)^{re.escape(name)}==\S+$", constraints), f"constraints.txt does not pin {name}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mkdocs build --strict" in readme and "mkdocs serve" in readme and '".[docs]"' in readme
