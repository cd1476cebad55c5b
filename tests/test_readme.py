"""The commands in README.md, docs/*.md and bench/README.md still work as written, and their links still lead somewhere.

Each fenced shell block (bash, sh, shell, console) is split into commands. For each one the test checks that its
entry point exists and that every flag it uses exists:

- `sentiment-nb` and `dvc` commands are parsed by the real argparse parsers (sentiment_nb.cli's, dvc's), so a wrong
  subcommand, flag or choice fails; `dvc exp run -S key=value` also needs `key` in params.yaml;
- other tools are checked against their own `--help` (pytest, pip, papermill, nbdev_*, ruff, serve, ray, gto, git,
  the bench/ scripts), and docker and curl, which may not be installed, against a small allow-list;
- paths inside the repository that a command names (nbs/..., bench/....py, params files) must exist.

Nothing here runs a command itself; the pipeline and serving tests do that.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
BUILTINS = {"cd", "export", "source", "echo"}
OPERATORS = {"&&", "||", ";", "|", "&"}
# a token naming something in the repository: these folders, or these files at its root
REPO_DIRS = ("nbs", "bench", "tests", "docs", "sentiment_nb", ".ci", ".github")
REPO_FILES = {"params.yaml", "dvc.yaml", "serve_config.yaml", "settings.ini", "Dockerfile", "pyproject.toml"}
OUTPUT_FLAGS = {"--json", "-o", "--out", "--output"}  # their values are written, not read
# tools that may not be installed where the tests run: the flags the docs may use
ALLOWED_FLAGS = {
    "curl": {"-s", "-S", "-sS", "-f", "--fail", "-i", "-H", "--header", "-d", "--data", "-X", "--json", "-o"},
    "docker build": {"-t", "--tag", "-f", "--file", "--build-arg"},
    "docker run": {"--rm", "-p", "--publish", "--shm-size", "--stop-timeout", "--gpus", "-v", "--volume", "-e",
                   "--env", "--restart", "-d", "--detach", "--name"},
}


# --- reading the pages ----------------------------------------------------------------------------------------------

def shell_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    "(line number of the first line, language, lines) of each fenced block, indented ones (in lists) included."
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, body, start = len(m.group(1)), m.group(2).lower(), [], i + 2
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        out.append((start, lang, body))
        i += 1
    return out


def command_lines(lang: str, body: list[str], start: int) -> list[tuple[int, str]]:
    "(line number, text) of each command in a block: continuation lines joined; in `console`, the `$ ` lines only."
    out, buf, first = [], "", None
    for n, line in enumerate(body, start):
        if not buf:
            if lang == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            first = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((first, buf))
        buf = ""
    return out


def substitutions(line: str) -> tuple[str, list[str]]:
    "`line` with each `$(...)` replaced by a placeholder word, and the commands inside them."
    inner, out, i = [], "", 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            inner.append(line[i + 2:j - 1])
            out += "SUBSTITUTED"
            i = j
        else:
            out += line[i]
            i += 1
    return out, inner


def split_commands(line: str) -> list[list[str]]:
    "The argv of each simple command on a shell line (comments dropped, `$(...)` inside included, env prefixes cut)."
    line, inner = substitutions(line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    argvs, cur = [], []
    for tok in lex:
        if tok in OPERATORS:
            argvs.append(cur)
            cur = []
        else:
            cur.append(tok)
    argvs.append(cur)
    argvs = [a[next((i for i, t in enumerate(a) if not re.match(r"^[A-Za-z_]\w*=", t)), len(a)):] for a in argvs]
    return [a for a in argvs if a] + [a for cmd in inner for a in split_commands(cmd)]


def commands(text: str) -> list[tuple[int, list[str]]]:
    "(line number, argv) of every command in the shell blocks of a Markdown text."
    return [(n, argv) for start, lang, body in shell_blocks(text) if lang in SHELL_LANGS
            for n, line in command_lines(lang, body, start) for argv in split_commands(line)]


def index_markdown() -> str:
    nb = json.loads((REPO / "nbs" / "index.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def documented_commands() -> list[tuple[str, list[str]]]:
    "Every command of the pages, and of the docs' home page (nbs/index.ipynb), with where it is written."
    return [(f"{page.relative_to(REPO)}:{n}", argv) for page in PAGES for n, argv in commands(page.read_text())] + \
        [(f"nbs/index.ipynb:{n}", argv) for n, argv in commands(index_markdown())]


# --- checking one command -------------------------------------------------------------------------------------------

def flags(args: list[str]) -> list[str]:
    "The options in `args` (`--x=1` as `--x`), up to a bare `--`."
    out = []
    for a in args:
        if a == "--":
            break
        if a.startswith("-") and a != "-" and not re.match(r"^-\d", a):
            out.append(a.split("=", 1)[0])
    return out


def flag_in(flag: str, help_text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def repo_paths(args: list[str]) -> list[str]:
    "The tokens of `args` that name something in the repository (output files aside)."
    out = []
    for prev, a in zip([None, *args], args, strict=False):
        if prev in OUTPUT_FLAGS or a.startswith("-") or "://" in a:
            continue
        if a in REPO_FILES or a.rstrip("/") in REPO_DIRS or a.split("/", 1)[0] in REPO_DIRS:
            out.append(a)
    return out


@functools.cache
def help_text(*cmd: str) -> tuple[int, str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0"})
    return p.returncode, p.stdout + p.stderr


def cli_parser() -> argparse.ArgumentParser:
    "The parser that `sentiment-nb` uses: the function of sentiment_nb.cli that builds it, found by what it returns."
    import sentiment_nb.cli as cli

    for name, fn in sorted(vars(cli).items(), key=lambda kv: kv[0] != "build_parser"):
        if not (inspect.isfunction(fn) and fn.__module__ == cli.__name__ and "parser" in name):
            continue
        if all(p.default is not p.empty for p in inspect.signature(fn).parameters.values()):
            parser = fn()
            if isinstance(parser, argparse.ArgumentParser):
                return parser
    raise AssertionError("sentiment_nb.cli has no function that builds its argparse parser")


def dvc_parser() -> argparse.ArgumentParser:
    from dvc.cli.parser import get_main_parser

    return get_main_parser()


def argparse_problems(parser: argparse.ArgumentParser, args: list[str], name: str) -> list[str]:
    "What `parser` says about `args`, or nothing when it accepts them (--help and --version count as accepted)."
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            return [f"{name} {' '.join(args)}: {(err.getvalue() or out.getvalue()).strip().splitlines()[-1:]}"]
    except Exception as e:  # dvc's parser raises DvcParserError instead of exiting
        return [f"{name} {' '.join(args)}: refused by the parser ({type(e).__name__}) "
                f"{(err.getvalue() or out.getvalue()).strip().splitlines()[-1:]}"]
    return []


def console_script(name: str) -> bool:
    return any(ep.name == name for ep in importlib.metadata.entry_points(group="console_scripts")) or \
        shutil.which(name) is not None


def params_key_problems(args: list[str]) -> list[str]:
    "`-S key=value` overrides of `dvc exp run` name keys of params.yaml (a `+key` adds one and is left alone)."
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = []
    for flag, value in zip(args, args[1:], strict=False):
        if flag not in ("-S", "--set-param") or value.startswith(("+", "~")):
            continue
        node = params
        for part in value.split("=", 1)[0].split("."):
            if not isinstance(node, dict) or part not in node:
                out.append(f"dvc exp run -S {value}: params.yaml has no key {value.split('=', 1)[0]!r}")
                break
            node = node[part]
    return out


def help_problems(cmd: list[str], args: list[str], name: str) -> list[str]:
    "Each flag of `args` must appear in the `--help` (or `-h`) output of `cmd`."
    rc, text = help_text(*cmd, "--help") if cmd[0] != "git" else help_text(*cmd, "-h")
    if cmd[0] != "git" and rc != 0:
        return [f"{name}: `{' '.join(cmd)} --help` failed (exit {rc}): not an existing command"]
    return [f"{name}: unknown flag {f}" for f in flags(args) if not flag_in(f, text)]


def subcommand(args: list[str]) -> tuple[str | None, list[str]]:
    return (args[0], args[1:]) if args and not args[0].startswith("-") else (None, args)


def check_python(args: list[str]) -> list[str]:
    if args[:1] == ["-c"]:
        return []
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return [f"python -m {module}: no such module"]
        return problems([module, *rest]) if module in CHECKS else []
    script, rest = args[0], args[1:]
    if not (REPO / script).is_file():
        return [f"python {script}: no such file in the repository"]
    return help_problems([sys.executable, str(REPO / script)], rest, f"python {script}")


def check_tool_with_subcommands(tool: str, args: list[str]) -> list[str]:
    sub, rest = subcommand(args)
    if not console_script(tool):
        return [f"{tool}: not installed"]
    return help_problems([tool, *([sub] if sub else [])], rest, f"{tool} {sub or ''}".strip())


def check_allow_listed(tool: str, args: list[str]) -> list[str]:
    sub, rest = subcommand(args) if tool == "docker" else (None, args)
    key = f"{tool} {sub}" if sub else tool
    if key not in ALLOWED_FLAGS:
        return [f"{key}: not a command these checks know"]
    return [f"{key}: flag {f} is not in the allow-list" for f in flags(rest) if f not in ALLOWED_FLAGS[key]]


PYTEST_OPTIONS: set[str] | None = None  # the options of the pytest running these tests, set by a fixture below


def check_pytest(args: list[str]) -> list[str]:
    if PYTEST_OPTIONS is None:  # outside a test, or a pytest whose private parser moved: ask `pytest --help`
        return help_problems([sys.executable, "-m", "pytest", "-c", "/dev/null"], args, "pytest")
    return [f"pytest: unknown flag {f}" for f in flags(args) if f not in PYTEST_OPTIONS]


def check_jupyter(args: list[str]) -> list[str]:
    sub, _ = subcommand(args)
    return [] if sub and shutil.which(f"jupyter-{sub}") else [f"jupyter {sub}: not installed"]


CHECKS = {
    "sentiment-nb": lambda a: ([] if console_script("sentiment-nb") else ["sentiment-nb: no console script"])
    + argparse_problems(cli_parser(), a, "sentiment-nb"),
    "dvc": lambda a: argparse_problems(dvc_parser(), a, "dvc") + (params_key_problems(a) if a[:2] == ["exp", "run"] else []),
    "pytest": lambda a: check_pytest(a),
    "pip": lambda a: help_problems([sys.executable, "-m", "pip", *subcommand(a)[0:1]], subcommand(a)[1], "pip"),
    "papermill": lambda a: help_problems(["papermill"], a, "papermill"),
    "ruff": lambda a: check_tool_with_subcommands("ruff", a),
    "serve": lambda a: check_tool_with_subcommands("serve", a),
    "ray": lambda a: check_tool_with_subcommands("ray", a),
    "gto": lambda a: check_tool_with_subcommands("gto", a),
    "git": lambda a: help_problems(["git", subcommand(a)[0] or "help"], subcommand(a)[1], "git"),
    "python": check_python,
    "bash": lambda a: [] if (REPO / a[0]).is_file() else [f"bash {a[0]}: no such file in the repository"],
    "jupyter": check_jupyter,
    "curl": lambda a: check_allow_listed("curl", a),
    "docker": lambda a: check_allow_listed("docker", a),
}


def problems(argv: list[str]) -> list[str]:
    "What is wrong with one documented command: an unknown entry point, flag or subcommand, a missing repo path."
    tool, args = argv[0], argv[1:]
    if tool in BUILTINS:
        return []
    if tool.startswith("nbdev_"):
        check = lambda a: (help_problems([tool], a, tool) if console_script(tool)  # noqa: E731
                           else [f"{tool}: not an nbdev command"])
    elif tool in ("python3", sys.executable):
        check = check_python
    else:
        check = CHECKS.get(tool)
    if check is None:
        return [f"{tool}: not an entry point these checks know (add it to CHECKS)"]
    missing = [f"{' '.join(argv[:2])}: {p} does not exist in the repository" for p in repo_paths(args)
               if not (REPO / p).exists()]
    return missing + check(args)


# --- the tests ------------------------------------------------------------------------------------------------------

DOCUMENTED = documented_commands()


@pytest.fixture(autouse=True, scope="module")
def _this_pytests_options(pytestconfig):
    "The options of this pytest run, its plugins included: the same as a documented `pytest` gets, without a `--help`."
    global PYTEST_OPTIONS
    try:
        PYTEST_OPTIONS = set(pytestconfig._parser.optparser._option_string_actions)
    except AttributeError:
        PYTEST_OPTIONS = None
    yield
    PYTEST_OPTIONS = None


def test_the_pages_have_commands():
    assert {where.split(":")[0] for where, _ in DOCUMENTED} >= {"README.md", "docs/serving.md", "docs/pipeline.md",
                                                                "bench/README.md"}
    tools = {argv[0] for _, argv in DOCUMENTED}
    assert {"pip", "dvc", "pytest", "sentiment-nb", "curl", "python"} <= tools


SLOW_TOOLS = {"ray", "serve"}  # their --help imports Ray: 3-4 s each, so they run with the slow tests


@pytest.mark.parametrize("where, argv", [
    pytest.param(w, argv, id=w, marks=[pytest.mark.slow] if argv[0] in SLOW_TOOLS else []) for w, argv in DOCUMENTED])
def test_documented_command_exists_with_its_flags(where, argv):
    assert problems(argv) == [], f"{where}: {shlex.join(argv)}"


BROKEN = [
    "sentiment-nb serve --no-such-flag",
    "sentiment-nb nosuchcommand",
    "sentiment-nb predict 'a film' --backend nosuchbackend",
    "dvc exp run --no-such-flag",
    "dvc exp rnu",
    "dvc exp run -S train.no_such_key=1",
    "pytest --no-such-flag",
    "pip install --no-such-flag torch",
    "papermill nbs/02_data.ipynb out.ipynb --no-such-flag",
    "papermill nbs/99_no_such_chapter.ipynb out.ipynb",
    "python bench/serve_load.py --no-such-flag",
    "python bench/no_such_bench.py",
    "nbdev_clean --no-such-flag",
    "nbdev_no_such_command",
    "git clone --no-such-flag https://example.com/x",
    "docker run --no-such-flag sentiment-nb",
    "curl --no-such-flag localhost:8000",
    "no-such-tool --x",
    "X=1 python -m no_such_module",
    "dvc exp run -S data.source=$(python bench/serve_load.py --no-such-flag)",
]


@pytest.mark.parametrize("cmd", BROKEN)
def test_a_wrong_flag_subcommand_or_path_is_caught(cmd):
    assert commands(f"```bash\n{cmd}\n```"), cmd
    assert [p for _, argv in commands(f"```bash\n{cmd}\n```") for p in problems(argv)], cmd


@pytest.mark.parametrize("cmd", [
    "sentiment-nb serve --port 8001 --backend onnx",
    "dvc exp run -S train.learning_rate=1e-4 -S +train.new_key=1",
    "pytest -m 'not slow'",
    "papermill nbs/02_data.ipynb out.ipynb -p params_file params.yaml",
    "python bench/serve_load.py --model model --rounds 2 --json bench/out.json",
    "docker run --rm -p 8000:8000 sentiment-nb",
])
def test_the_same_commands_written_right_pass(cmd):
    "The checks that catch the broken commands above accept their correct forms: they fail on the flag, not always."
    assert [p for _, argv in commands(f"```bash\n{cmd}\n```") for p in problems(argv)] == []


def test_the_parser_reads_shell_as_the_shell_does():
    text = "\n".join([
        "```console", "$ pip install -e \".[dev]\"  # comment", "output line", "```",
        "   ```bash", "   dvc exp run \\", "     -S a.b=$(python -c \"print(1)\") && X=1 sentiment-nb info", "   ```",
        "```python", "not_a_command --x", "```"])
    assert [argv for _, argv in commands(text)] == [
        ["pip", "install", "-e", ".[dev]"], ["dvc", "exp", "run", "-S", "a.b=SUBSTITUTED"], ["sentiment-nb", "info"],
        ["python", "-c", "print(1)"]]
    assert [n for n, _ in commands(text)] == [2, 6, 6, 6]


# --- links and the front door ---------------------------------------------------------------------------------------

def relative_links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [*PAGES, REPO / "nbs" / "index.ipynb"], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
    text = index_markdown() if page.suffix == ".ipynb" else page.read_text()
    missing = [t for t in relative_links(text) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.split()) < 1800, "README.md is the front door: move detail to docs/ or bench/README.md"
    chapters = {p.name for p in (REPO / "nbs").glob("[0-9]*.ipynb")}
    linked = {Path(t).name for t in relative_links(readme) if t.startswith("nbs/")}
    assert chapters <= linked, f"chapters missing from README's layout: {sorted(chapters - linked)}"
    index_links = {Path(t).name for t in relative_links(index_markdown()) if t.endswith(".ipynb")}
    assert chapters <= index_links, f"chapters missing from nbs/index.ipynb: {sorted(chapters - index_links)}"


def layout_rows(text: str) -> list[tuple[str, str]]:
    "(chapter file, module) of each row of a layout table: `| [00_config](…00_config.ipynb) | `config` | … |`."
    return [(Path(link).name, module) for link, module in
            re.findall(r"^\|\s*\[[^\]]+\]\(([^)]+\.ipynb)\)\s*\|\s*`([\w.]+)`\s*\|", text, re.M)]


@pytest.mark.parametrize("source", ["README.md", "nbs/index.ipynb"])
def test_the_layout_tables_name_each_chapters_module(source):
    "Each chapter in the table exports the module the table names (`#| default_exp`), and that module exists."
    text = index_markdown() if source.endswith(".ipynb") else (REPO / source).read_text()
    rows = layout_rows(text)
    assert len(rows) >= 10, rows
    for chapter, module in rows:
        nb = (REPO / "nbs" / chapter).read_text()
        assert f"#| default_exp {module}\\n" in nb or f"#| default_exp {module}\"" in nb, (chapter, module)
        assert (REPO / "sentiment_nb" / (module.replace(".", "/") + ".py")).is_file(), module
