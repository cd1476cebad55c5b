"""Fixtures shared by the end-to-end pipeline tests (test_pipeline, test_dvc_remote)."""
import os
import sys
from pathlib import Path

import pytest
from helpers import FIXTURE_DATA, copy_repo, git, run, smoke_params, write_params


def dvc(root, *args, check=True):
    return run([sys.executable, "-m", "dvc", *args], cwd=root, check=check)


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory, tiny_model_dir):
    """A copy of the repo whose params.yaml is the smoke configuration, after one `dvc repro`, its run committed.

    One full run serves every end-to-end pipeline test: each test that changes the project puts it back."""
    root = copy_repo(tmp_path_factory.mktemp("project"))
    write_params(root / "params.yaml", smoke_params(FIXTURE_DATA, tiny_model_dir))
    git(root, "commit", "-qam", "smoke params")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # papermill, dvc
    first = dvc(root, "repro")
    git(root, "add", "-A")  # dvc.lock, metrics and plots go through git; the rest through DVC
    git(root, "commit", "-qm", "smoke run")
    return root, first


def pytest_collection_modifyitems(items):
    "The notebooks run their stage end to end (nbval, on the smoke params): they belong to the slow tests."
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
