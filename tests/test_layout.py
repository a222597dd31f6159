"""Package layout invariants (DESIGN.md section 1), checked on the source text: no import is executed."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[1] / "hierseg" / "serve"
DATA = SERVE.parent / "data"


def _imported(tree: ast.AST) -> list[str]:
    """Every module an ``import``/``from ... import`` names, lazy ones inside functions included."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from hierseg import train" names the package through its alias list
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _imports_of(package: Path, forbidden: str) -> list[str]:
    """``file: module`` for every import of ``forbidden`` (or a module under it) in ``package``'s files."""
    files = sorted(package.glob("*.py"))
    assert len(files) > 5, f"{package}: modules not found"
    return [
        f"{path.name}: {name}"
        for path in files
        for name in _imported(ast.parse(path.read_text(), filename=str(path)))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_serve_never_imports_train():
    bad = _imports_of(SERVE, "hierseg.train")
    assert not bad, f"hierseg/serve must not import hierseg.train: {bad}"


def test_data_never_imports_serve():
    """The one volume reader lives in hierseg.data, which serving imports: the other way round would be a cycle."""
    bad = _imports_of(DATA, "hierseg.serve")
    assert not bad, f"hierseg/data must not import hierseg.serve: {bad}"


def test_old_module_paths_are_the_moved_modules():
    """Models logged before the move run code doing ``from hierseg.pyfunc import ...``: the old names must
    be the moved modules themselves (one module object, so a monkeypatch of either path patches both)."""
    import importlib

    for name in ("infer", "stackio", "blockwise", "omezarr", "evaluate", "pyfunc", "mlflow_model"):
        assert importlib.import_module(f"hierseg.{name}") is importlib.import_module(f"hierseg.serve.{name}"), name
    from hierseg.infer import default_options, load_predictor  # noqa: F401  (what old mlflow_model.py imports)
    from hierseg.pyfunc import CHECKPOINT_ARTIFACT  # noqa: F401
