"""Static checks of the docs workflow (.github/workflows/deploy.yaml): quarto cannot run here, so check its shape.

It must build on a push to main, install CPU torch before the package (a bare `pip install -e ".[dev]"` pulls a CUDA
build), run `nbdev_docs`, and publish the folder nbdev writes (settings.ini's doc_path) with the right permission."""
import configparser
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"


def load(name: str) -> dict:
    wf = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in wf:  # YAML 1.1 reads the key `on` as a boolean
        wf["on"] = wf.pop(True)
    return wf


def steps(wf: dict) -> list[dict]:
    (job,) = wf["jobs"].values()
    return job["steps"]


def index(steps: list[dict], pred) -> int:
    found = [i for i, s in enumerate(steps) if pred(s)]
    assert found, "no such step"
    return found[0]


def runs(step: dict, pattern: str) -> bool:
    return any(re.search(pattern, line) for line in step.get("run", "").splitlines())


@pytest.fixture(scope="module")
def deploy() -> dict:
    return load("deploy.yaml")


def test_it_builds_on_a_push_to_main_and_may_push_the_site(deploy):
    assert "main" in deploy["on"]["push"]["branches"]
    assert deploy["permissions"]["contents"] == "write"


def test_cpu_torch_is_installed_before_the_package(deploy):
    s = steps(deploy)
    torch = index(s, lambda st: runs(st, r"pip install torch==[\d.]+ --index-url https://download\.pytorch\.org/whl/cpu"))
    package = index(s, lambda st: runs(st, r'pip install -e "?\.\[dev\]"?'))
    assert torch <= package
    if torch == package:  # one step: the torch line comes first in it
        lines = s[torch]["run"].splitlines()
        assert next(i for i, x in enumerate(lines) if "torch==" in x) < next(i for i, x in enumerate(lines) if "-e " in x)
    assert not any("fastai/workflows" in st.get("uses", "") for st in s), "the stock action installs CUDA torch"


def test_it_pins_the_torch_and_python_that_ci_uses(deploy):
    ci = load("ci.yml")
    (ci_job,) = ci["jobs"].values()
    ci_env = next(st["env"] for st in ci_job["steps"] if "env" in st and "TORCH_SPEC" in st["env"])
    ci_python = next(st["with"]["python-version"] for st in ci_job["steps"] if "setup-python" in st.get("uses", ""))
    s = steps(deploy)
    assert any(runs(st, re.escape(f"pip install {ci_env['TORCH_SPEC']} --index-url {ci_env['TORCH_INDEX_URL']}"))
               for st in s)
    assert next(st["with"]["python-version"] for st in s if "setup-python" in st.get("uses", "")) == ci_python


def test_quarto_is_set_up_then_nbdev_docs_builds_then_the_doc_path_is_published(deploy):
    s = steps(deploy)
    quarto = index(s, lambda st: st.get("uses", "").startswith("quarto-dev/quarto-actions/setup@"))
    build = index(s, lambda st: runs(st, r"^\s*nbdev_docs\b"))
    publish = index(s, lambda st: st.get("uses", "").startswith("peaceiris/actions-gh-pages@"))
    assert index(s, lambda st: st.get("uses", "").startswith("actions/checkout@")) == 0
    assert quarto < build < publish
    ini = configparser.ConfigParser()
    ini.read(REPO / "settings.ini")
    assert Path(s[publish]["with"]["publish_dir"]) == Path(ini["DEFAULT"]["doc_path"])
    assert s[publish]["with"]["github_token"] == "${{ secrets.GITHUB_TOKEN }}"


def test_a_workflow_that_skips_the_build_fails_these_checks(deploy):
    "The checks above can fail: the same workflow without its nbdev_docs step, or with torch after the package."
    broken = {**deploy, "jobs": {"deploy": {"steps": [st for st in steps(deploy) if not runs(st, "nbdev_docs")]}}}
    with pytest.raises(AssertionError):
        test_quarto_is_set_up_then_nbdev_docs_builds_then_the_doc_path_is_published(broken)
    swapped = [dict(st) for st in steps(deploy)]
    for st in swapped:
        if "run" in st and "torch==" in st["run"]:
            st["run"] = "\n".join(reversed(st["run"].splitlines()))
    with pytest.raises(AssertionError):
        test_cpu_torch_is_installed_before_the_package({**deploy, "jobs": {"deploy": {"steps": swapped}}})


def test_the_reports_get_widget_progress_bars():
    "The stages run notebooks under papermill: without ipywidgets, tqdm warns 'IProgress not found' in every report."
    from packaging.requirements import Requirement

    ini = configparser.ConfigParser()
    ini.read(REPO / "settings.ini")
    assert "ipywidgets" in {Requirement(r).name for r in ini["DEFAULT"]["requirements"].split()}
