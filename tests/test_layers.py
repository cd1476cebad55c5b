"""The library's import layers: which generated modules each module may import, lazy imports inside functions too.

Serving must never load the training stack, and the stages share only `config` (and `data`) unless they score a
model, which they do through `predict`, the code that serving runs.
"""
import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "sentiment_nb"
ALLOWED = {
    "config": set(),
    "data": {"config"},
    "train": {"config", "data"},
    "export": {"config", "data"},
    "onnx_export": {"config", "predict"},  # checks its graphs against PyTorch through the predictors
    "evaluate": {"config", "data", "predict"},  # scores what will be served, backend by backend
    "predict": {"config"},
    "serve": {"config", "predict"},
    "cli": {"config", "predict", "serve"},
}


MODULES = {p.stem for p in LIBRARY.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    "The modules of the package that `path` imports anywhere in its code (the package root, for __version__, aside)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if not (node.level or name == "sentiment_nb" or name.startswith("sentiment_nb.")):
                continue
            inner = name if node.level else name.removeprefix("sentiment_nb").lstrip(".")
            if inner:  # from .config import ... / from sentiment_nb.config import ...
                found.add(inner.split(".")[0])
            else:  # from . import serve / from sentiment_nb import serve
                found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sentiment_nb.")}
    return found


def test_every_module_has_a_layer():
    assert {p.stem for p in LIBRARY.glob("*.py") if not p.stem.startswith("_")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_the_layers_below_it(module):
    assert imported_modules(LIBRARY / f"{module}.py") <= ALLOWED[module]


def test_the_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from sentiment_nb.train import fit\n    from .data import load_splits\n"
                 "    from sentiment_nb import evaluate, __version__\n    from . import serve\n"
                 "    import sentiment_nb.export as ex\n")
    assert imported_modules(f) == {"train", "data", "evaluate", "serve", "export"}
