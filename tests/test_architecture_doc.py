"""docs/architecture.md against the code: every public name it lists exists.

The page's convention: a section titled with a module in backticks (## `facenet_jax.x`, or
several: ## `facenet_jax.x`, `facenet_jax.y`) lists that module's contract in indented code
lines; a line that starts (4 spaces in) with `name(`, `NAME =`, `Name.attr(` or
`facenet_jax.full.path(` names a public attribute, which must resolve. Lines indented deeper are
continuations and comments; `python -m` commands and config keys are prose, not names.
"""

import importlib
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
_SECTION = re.compile(r"^## (.*)$")
_MODULE = re.compile(r"`(facenet_jax(?:\.\w+)*)`")
_NAME = re.compile(r"^    ([A-Za-z_][\w.]*)\s*(?:\(|=|:)")


def _listed_names() -> list[tuple[list[str], str, int]]:
    """(the section's modules, the dotted name, line number) for every listed name."""
    modules: list[str] = []
    listed = []
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        heading = _SECTION.match(line)
        if heading:
            modules = _MODULE.findall(heading.group(1))
            continue
        name = _NAME.match(line)
        if name and modules and not name.group(1).startswith(("config.", "python")):
            listed.append((modules, name.group(1), number))
    return listed


def _resolves(modules: list[str], dotted: str) -> bool:
    if dotted.startswith("facenet_jax."):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            return _attribute(target, parts[cut:]) is not None
        return False
    for module in modules:
        if _attribute(importlib.import_module(module), dotted.split(".")) is not None:
            return True
    return False


def _attribute(target, parts):
    for part in parts:
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def test_the_page_lists_names_under_module_sections():
    listed = _listed_names()
    assert len(listed) > 100, "the convention above must match the page"
    assert len({m for modules, _, _ in listed for m in modules}) > 15


@pytest.mark.parametrize("modules,name,line", _listed_names(),
                         ids=[f"L{line}:{name}" for _, name, line in _listed_names()])
def test_every_listed_name_exists(modules, name, line):
    assert _resolves(modules, name), (
        f"docs/architecture.md:{line} lists {name!r}, which none of {modules} defines: update "
        "the page or the code")
