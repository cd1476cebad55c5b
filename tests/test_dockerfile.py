"""Static checks of the Dockerfile (Docker cannot run here): what it copies, runs, exposes and checks."""
import fnmatch
import json
import shlex
from pathlib import Path

import pytest
import yaml

from sentiment_nb.cli import build_parser
from sentiment_nb.config import load_params

REPO = Path(__file__).resolve().parents[1]


def instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) for each instruction, with continuation lines joined and comments dropped."
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def args_of(name: str) -> list[str]:
    return [a for n, a in instructions() if n == name]


def exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"use the exec (JSON) form, so that signals reach the server: {text}"
    return json.loads(text)


def dvc_outputs() -> set[str]:
    "The folders that `dvc repro` makes (stage outs, with `${paths.x}` filled in from params.yaml)."
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    outs = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for o in stage.get("outs", []):
            o = next(iter(o)) if isinstance(o, dict) else o
            for k, v in paths.items():
                o = o.replace("${paths." + k + "}", v)
            outs.add(o.strip("/"))
    return outs


def copies() -> list[str]:
    srcs = []
    for a in args_of("COPY"):
        parts = [p for p in shlex.split(a) if not p.startswith("--")]
        srcs += parts[:-1]
    return srcs


def test_every_copied_path_exists_or_is_made_by_dvc():
    made = dvc_outputs()
    assert copies(), "the Dockerfile copies nothing"
    for src in copies():
        src = src.rstrip("/")
        assert (REPO / src).exists() or src in made, f"COPY {src}: not in the repo and not a DVC output"


def test_the_model_folder_is_copied_and_is_the_export_output():
    assert "model" in [s.rstrip("/") for s in copies()]
    assert load_params(REPO / "params.yaml").paths.model == "model" and "model" in dvc_outputs()


def test_dockerignore_keeps_what_is_copied_and_drops_the_heavy_folders():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for src in copies():
        src = src.rstrip("/")
        assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{src} is copied but .dockerignore drops it"
    for heavy in (".git", ".venv", "data", "artifacts"):
        assert heavy in patterns


def test_cmd_is_a_valid_serve_command_on_all_interfaces():
    cmd = exec_form(args_of("CMD")[-1])
    assert cmd[0] == "sentiment-nb"
    args = build_parser().parse_args(cmd[1:])  # exits (fails the test) on an option the CLI does not have
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port or 8000) == 8000
    assert args.model and Path(args.model).as_posix().rstrip("/") == "/app/model"
    workdir = args_of("WORKDIR")[-1]
    assert workdir == "/app" and "model/" in [c for c in copies()]


def test_exposes_8000_and_checks_healthz_on_it():
    assert "8000" in " ".join(args_of("EXPOSE")).split()
    hc = args_of("HEALTHCHECK")
    assert len(hc) == 1 and "/healthz" in hc[0] and ":8000/" in hc[0]


def test_runs_as_a_user_other_than_root():
    users = args_of("USER")
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    names = [n for n, _ in instructions()]
    assert names.index("CMD") > len(names) - 1 - names[::-1].index("USER")  # USER comes before CMD


def test_cpu_torch_by_default_with_a_build_arg_for_cuda():
    args = dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch_install = [a for a in args_of("RUN") if "torch" in a and "TORCH_INDEX_URL" in a]
    assert torch_install, "torch must be installed from ${TORCH_INDEX_URL}"
    base = args_of("FROM")[0]
    assert "slim" in base


@pytest.mark.parametrize("pkg", ["ray[serve]", "transformers", "fastapi"])
def test_serving_dependencies_are_installed(pkg):
    assert any(pkg in a for a in args_of("RUN"))


def test_the_image_pins_what_settings_ini_pins():
    "A package the image installs by hand carries the same version range as in settings.ini, so the two can't drift."
    import configparser

    from packaging.requirements import Requirement

    ini = configparser.ConfigParser()
    ini.read(REPO / "settings.ini")
    wanted = {(r := Requirement(t)).name: r for t in ini["DEFAULT"]["requirements"].split()}
    installs = [shlex.split(a.split("&&")[0]) for a in args_of("RUN") if a.startswith("pip install") and "torch==" not in a]
    assert installs, "the image installs its serving stack with pip"
    checked = []
    for token in (t for words in installs for t in words[2:] if not t.startswith("-") and t != "."):
        got = Requirement(token)
        assert got.name in wanted, f"the image installs {got.name}, which settings.ini does not require"
        assert (got.specifier, got.extras) == (wanted[got.name].specifier, wanted[got.name].extras), token
        checked.append(got.name)
    assert {"transformers", "ray", "onnxruntime"} <= set(checked)
