"""Each install of pyproject.toml (the core, and each extra with it) brings what its feature imports.

The closure of an extra X: the core dependencies and X's, read from pyproject.toml (what
`pip install -e '.[X]'` reads), then each installed distribution's own requirements,
recursively (`importlib.metadata`; markers evaluated on this machine for the extras asked).
The feature of X: the files FEATURES[X] names. Two checks per install:
- its imports: every third-party top-level module the feature's files import (`ast`, imports
  inside functions included), mapped to distributions by `packages_distributions()`, is in
  the closure;
- a fresh interpreter in which any installed top-level module from a distribution outside the
  closure cannot be imported imports the feature's modules and those modules. This catches a
  dependency that imports an undeclared one of its own (`mtcnn` imports TensorFlow without
  requiring it).
The suite runs with every extra installed, so "outside the closure" is simulated, not deleted.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements")
packaging_utils = pytest.importorskip("packaging.utils")

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "facenet_jax"
CORE = ""
PROJECT = "facenet-jax"  # the distribution itself (editable installs map facenet_jax to it)
# The files each install exists for; the core is every package module no extra claims.
EXTRA_FILES = {
    "align": ["facenet_jax/align.py"],
    "pretrained": ["facenet_jax/pretrained.py"],
    "tfds": ["facenet_jax/data/tfds_source.py"],
    "pretrained-tf": ["facenet_jax/pretrained_tf.py"],
    "stream": ["facenet_jax/data/stream.py"],
    "test": sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py")),
}
FIRST_PARTY = {"facenet_jax", "benchmarks", *(p.stem for p in (REPO / "tests").glob("*.py"))}


def feature_files(extra: str) -> list[pathlib.Path]:
    if extra != CORE:
        return [REPO / path for path in EXTRA_FILES[extra]]
    claimed = {REPO / path for extra in EXTRA_FILES for path in EXTRA_FILES[extra]}
    return sorted(p for p in PACKAGE.rglob("*.py") if p not in claimed)


def project_requirements(extra: str) -> list[str]:
    """The requirement strings `pip install -e '.[extra]'` starts from (the core's alone for
    CORE)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return list(project["dependencies"]) + (list(optional[extra]) if extra != CORE else [])


def requirement_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions `requirements` bring, recursively through each
    installed distribution's requirements (a distribution not installed here ends its branch)."""
    Requirement = packaging_requirements.Requirement
    canonical = packaging_utils.canonicalize_name
    walked: dict[str, set[str]] = {}  # distribution -> extras whose requirements were walked
    pending = [(Requirement(text), {""}) for text in requirements]
    while pending:
        requirement, asked_extras = pending.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra})
                                          for extra in asked_extras):
            continue
        name = canonical(requirement.name)
        extras = {"", *requirement.extras}
        if extras <= walked.get(name, set()):
            continue
        walked.setdefault(name, set()).update(extras)
        try:
            requires = importlib.metadata.distribution(requirement.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pending.extend((Requirement(text), extras) for text in requires)
    return set(walked)


def imported_top_level(path: pathlib.Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in a file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def imported_with_a_fallback(paths: list[pathlib.Path]) -> set[str]:
    """Modules the files import only inside `try: ... except ImportError` (a speed-up with a
    fallback, e.g. rec.py's simplejpeg beside PIL): optional by design, so another extra's."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try) and any(
                    getattr(handler.type, "id", None) in ("ImportError", "ModuleNotFoundError")
                    for handler in node.handlers):
                for statement in node.body:
                    if isinstance(statement, ast.Import):
                        names.update(a.name.partition(".")[0] for a in statement.names)
                    elif isinstance(statement, ast.ImportFrom) and statement.module:
                        names.add(statement.module.partition(".")[0])
    return names


def skipped_when_absent(paths: list[pathlib.Path]) -> set[str]:
    """Modules the files import only behind `pytest.importorskip("name")`: optional by design
    (the tests that need them skip), so another extra's."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value.partition(".")[0])
    return names


def third_party_imports(extra: str) -> set[str]:
    files = feature_files(extra)
    names = set().union(*map(imported_top_level, files))
    names -= (FIRST_PARTY | set(sys.stdlib_module_names) | skipped_when_absent(files)
              | imported_with_a_fallback(files))
    return names


def distributions_of(names: set[str]) -> dict[str, set[str]]:
    """Import name -> canonical names of the installed distributions that provide it."""
    provided = importlib.metadata.packages_distributions()
    canonical = packaging_utils.canonicalize_name
    return {name: {canonical(d) for d in provided.get(name, [])} for name in names}


def feature_modules(extra: str) -> list[str]:
    """Dotted names of the feature's importable package modules (none for the test extra)."""
    return ([".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
             for p in feature_files(extra) if PACKAGE in p.parents and p.name != "__main__.py"])


INSTALLS = [CORE, *EXTRA_FILES]


def test_every_extra_has_its_feature_files():
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(optional) == set(EXTRA_FILES), "name the files each extra exists for"
    for extra in EXTRA_FILES:
        assert all(path.is_file() for path in feature_files(extra)), extra
    assert len(feature_files(CORE)) > 40 and PACKAGE / "train" / "step.py" in feature_files(CORE)


def test_closure_follows_markers_extras_and_installed_requirements():
    closure = requirement_closure(["absl-py", "numpy; python_version < '3'",
                                   "jax; extra == 'unasked'"])
    assert closure == {"absl-py"}
    # optax requires jax, which requires jaxlib: two levels down.
    assert {"optax", "jax", "jaxlib", "numpy"} <= requirement_closure(["optax"])


def test_imports_are_read_everywhere_in_a_file(tmp_path):
    source = tmp_path / "feature.py"
    source.write_text(textwrap.dedent("""\
        import os, numpy.linalg as la
        from PIL import Image
        from . import sibling
        def lazy():
            from tensorflow import keras
            import mtcnn
        """))
    assert imported_top_level(source) == {"os", "numpy", "PIL", "tensorflow", "mtcnn"}


@pytest.mark.parametrize("extra", INSTALLS, ids=lambda e: e or "core")
def test_feature_imports_are_in_the_install(extra):
    names = third_party_imports(extra)
    providers = distributions_of(names)
    absent = sorted(name for name, dists in providers.items() if not dists)
    if absent:
        pytest.skip(f"not installed here, so not mapped to a distribution: {absent}")
    closure = requirement_closure(project_requirements(extra))
    missing = {name: sorted(dists) for name, dists in providers.items() if not dists & closure}
    assert not missing, (f"pip install '.[{extra}]' does not install what its files import: "
                         f"{missing}; add them to pyproject.toml")


# Run in a fresh interpreter: argv[1] JSON {distributions allowed, import name -> its
# distributions, modules to import}.
_BLOCKED_IMPORT = textwrap.dedent("""\
    import importlib, importlib.abc, json, sys
    spec = json.loads(sys.argv[1])
    allowed, providers = set(spec["allowed"]), spec["providers"]

    class OutsideTheInstall(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            dists = providers.get(name)
            if dists and not allowed.intersection(dists):
                raise ModuleNotFoundError(
                    f"{name!r} comes from {dists}, which this install does not bring", name=name)
            return None

    sys.meta_path.insert(0, OutsideTheInstall())
    for module in spec["modules"]:
        importlib.import_module(module)
    """)


@pytest.mark.slow
@pytest.mark.parametrize("extra", INSTALLS, ids=lambda e: e or "core")
def test_feature_imports_with_only_the_install_present(extra):
    names = third_party_imports(extra)
    if not all(distributions_of(names).values()):
        pytest.skip("a module the feature imports is not installed here")
    closure = requirement_closure(project_requirements(extra)) | {PROJECT}
    providers = distributions_of(set(importlib.metadata.packages_distributions()))
    spec = {"allowed": sorted(closure),
            "providers": {name: sorted(dists) for name, dists in providers.items()},
            "modules": feature_modules(extra) + sorted(names)}
    result = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, json.dumps(spec)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, (
        f"with only pip install '.[{extra}]' present, importing its feature fails:\n"
        f"{result.stderr[-3000:]}")
