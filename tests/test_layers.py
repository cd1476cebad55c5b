"""The library's import layers: which generated modules each module may import, lazy imports inside functions too.

Every module of the package is listed, those of its sub-packages (`serve.api`, ...) included, and the arrows go one
way. Serving must never load the training stack, not even through another module, and the stages share only
`config` and `model_dir` (and `data`) unless they score a model, which they do through `predict`, the code that
serving runs.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "sentiment_nb"
SERVE = {"serve.api", "serve.app", "serve.server"}
ALLOWED = {
    "config": set(),
    "model_dir": {"config"},  # the model-folder contract: files, label names, ONNX names, check_model_dir
    "metrics": set(),  # one compute_metrics for train and evaluate
    "data": {"config", "model_dir"},
    "calibrate": {"config", "data", "metrics"},  # temperature scaling after training, folded into the weights
    "train": {"config", "model_dir", "data", "metrics", "calibrate"},
    "export": {"config", "model_dir"},  # the folder contract only: no datasets or pandas for a tuple of label names
    "predict": {"config", "model_dir"},
    "features": set(),  # per-text features under the model's tokenizer: replicas log them, the monitor compares them
    "onnx_export": {"config", "model_dir", "predict"},  # checks its graphs against PyTorch through the predictors
    "evaluate": {"config", "model_dir", "data", "predict", "metrics", "calibrate"},  # scores what will be served, backend by backend
    "serve.api": {"config"},  # the HTTP contract: schemas, errors, body limit, page, the FastAPI app without routes
    "registry": {"config", "model_dir"},  # versions and stages (GTO), fetching a version (DVC); no model code
    "serve.app": {"config", "model_dir", "predict", "features", "registry", "serve.api"},  # deployments, build_app
    "serve.server": {"config", "serve.api", "serve.app"},  # running a server: ports, HAProxy, Ray, start/stop
    "batch": {"config", "model_dir", "predict"},  # scoring files chunk by chunk, with the predictors serving runs
    "batch_ray": {"config", "model_dir", "predict", "batch"},  # the same job on Ray Data
    "monitor": {"config", "model_dir", "predict", "features"},  # drift of traffic against the reference (Evidently)
    "cli": {"config", "model_dir", "predict", "batch", "batch_ray", "monitor", "registry", *SERVE},
}
TRAINING_STACK = {"train", "data", "evaluate", "export", "metrics", "calibrate"}  # and the third-party packages below
TRAINING_PACKAGES = {"datasets", "pandas", "sklearn", "dvclive", "accelerate"}
MONITOR_PACKAGES = {"evidently"}  # the offline comparison only: never in a replica
REGISTRY_PACKAGES = {"dvc", "gto"}  # the driver resolves a registry reference with them; importing serving loads neither
LOADED_BY_RAY = {"pandas"}  # Ray Serve imports pandas itself: only its absence from our own imports can be checked


def module_name(path: Path) -> str:
    "The dotted name of `path` inside the package: `config`, `serve.app`; a package's `__init__.py` gives `serve`."
    parts = path.relative_to(LIBRARY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules(root: Path = LIBRARY) -> dict[str, Path]:
    "Every generated module of the package, sub-packages included (nbdev's `_modidx` and the root `__init__` aside)."
    return {module_name(p): p for p in sorted(root.rglob("*.py"))
            if not p.name.startswith("_") and "__pycache__" not in p.parts}


MODULES = library_modules()
PACKAGES = {module_name(p) for p in LIBRARY.rglob("__init__.py")} - {""}


def resolve(node: ast.ImportFrom, module: str) -> str | None:
    "The package-relative dotted name that `from X import ...` names in `module`; None outside the package."
    name = node.module or ""
    if node.level:
        package = module.split(".")[:-1]  # the package this module is in ("serve.app" -> ["serve"])
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + ([name] if name else []))
    if name == "sentiment_nb" or name.startswith("sentiment_nb."):
        return name.removeprefix("sentiment_nb").lstrip(".")
    return None


def imported_modules(path: Path, module: str | None = None) -> set[str]:
    "The modules of the package that `path` imports anywhere in its code (the package root, for __version__, aside)."
    module = module or module_name(path)
    known = set(MODULES) | PACKAGES
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            inner = resolve(node, module)
            if inner is None:
                continue
            if inner in PACKAGES or not inner:  # from . import serve / from sentiment_nb.serve import server
                found |= {f"{inner}.{a.name}".lstrip(".") for a in node.names} & known or ({inner} - {""})
            else:  # from .config import ... / from ..config import ... / from sentiment_nb.serve.app import ...
                found.add(inner)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("sentiment_nb.") for a in node.names if a.name.startswith("sentiment_nb.")}
    return found


def third_party(path: Path) -> set[str]:
    "The top-level names of the packages outside this one that `path` imports anywhere."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found - {"sentiment_nb"}


def closure(start: set[str]) -> set[str]:
    "The modules that `start` imports, directly or through others."
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen and m in MODULES:
            seen.add(m)
            todo.extend(imported_modules(MODULES[m], m))
    return seen


def test_every_module_has_a_layer():
    assert set(MODULES) == set(ALLOWED)
    assert SERVE <= set(MODULES), "the serving sub-package is listed module by module"


def test_setuptools_installs_every_sub_package():
    "`pip install .` (the Docker image) takes the packages `find_packages` finds: the sub-packages must be among them."
    import setuptools

    found = setuptools.find_packages(str(LIBRARY.parent), include=["sentiment_nb", "sentiment_nb.*"])
    assert {f"sentiment_nb.{p}" for p in PACKAGES} <= set(found), found


def test_the_sub_packages_inits_import_nothing():
    for package in PACKAGES:
        init = LIBRARY / package.replace(".", "/") / "__init__.py"
        assert imported_modules(init, f"{package}.__init__") == set(), init


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_the_layers_below_it(module):
    assert imported_modules(MODULES[module], module) <= ALLOWED[module]


def test_the_layers_go_one_way():
    "No cycle among the allowed arrows: a module never reaches itself."
    for module in ALLOWED:
        reach, todo = set(), list(ALLOWED[module])
        while todo:
            m = todo.pop()
            if m not in reach:
                reach.add(m)
                todo.extend(ALLOWED[m])
        assert module not in reach, module


@pytest.mark.parametrize("module", sorted(SERVE))
def test_serving_never_reaches_the_training_stack(module):
    "Not even through another module, lazy imports included: a replica loads the model, not the training code."
    reached = closure({module})
    assert not reached & TRAINING_STACK, reached
    for m in reached:
        banned = TRAINING_PACKAGES | MONITOR_PACKAGES
        assert not third_party(MODULES[m]) & banned, (m, third_party(MODULES[m]) & banned)


def test_monitoring_and_the_registry_never_reach_the_training_stack():
    assert not closure({"monitor"}) & TRAINING_STACK
    assert not closure({"registry"}) & TRAINING_STACK
    assert not third_party(MODULES["registry"]) & (TRAINING_PACKAGES | MONITOR_PACKAGES)
    assert not third_party(MODULES["monitor"]) & (TRAINING_PACKAGES - {"pandas"})  # pandas: Evidently's frames


def test_importing_the_serving_modules_loads_no_training_package_nor_evidently():
    code = ("import sys\nimport sentiment_nb.serve.server, sentiment_nb.serve.app, sentiment_nb.predict\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(TRAINING_PACKAGES - LOADED_BY_RAY | MONITOR_PACKAGES | REGISTRY_PACKAGES)!r} "
            f"or m in {sorted('sentiment_nb.' + m for m in TRAINING_STACK)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_check_can_fail(tmp_path):
    root = tmp_path / "sentiment_nb"
    (root / "serve").mkdir(parents=True)
    f = root / "serve" / "m.py"
    f.write_text("def f():\n    from sentiment_nb.train import fit\n    from ..data import load_splits\n"
                 "    from sentiment_nb import evaluate, __version__\n    from . import api\n"
                 "    from .app import build_app\n    from sentiment_nb.serve import server\n"
                 "    import sentiment_nb.export as ex\n    import datasets\n")
    assert imported_modules(f, "serve.m") == {"train", "data", "evaluate", "serve.api", "serve.app", "serve.server",
                                              "export"}
    assert third_party(f) == {"datasets"}
    assert not {"train", "data"} <= ALLOWED["serve.app"]
