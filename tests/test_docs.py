"""The README and docs/ as a newcomer meets them: links and anchors resolve, the README is short and opens with a real
picture, its offline quick start runs as written, and every other command names real scripts and options.

Commands come from fenced blocks (and inline code that starts like a command). An HTML comment on the line before a
block says what else to do with it:

- `<!-- test: offline; writes A B -->`: run it here, in a temporary folder (Python: exec; bash: each command as a
  process, `arpg-hf` as `python -m arpg_hf`), then check that A and B were written and nothing outside `outputs/`;
- `<!-- test: setup; writes ... -->`: the README's set-up block: the same, except that its `pip install` parts are only
  checked (the extras they name exist) and the test command is this suite.

Every other command is checked without running it: `python SCRIPT`, `accelerate launch [...] SCRIPT` and `arpg-hf`
must name an existing script and only options that its argparse parser accepts, and a command without placeholders
(`[...]`, `A|B`, `...`, `DIR`) must parse as a whole. One helper process (this file run as a script) imports every
script named, with `parse_known_args` replaced so that the script hands over its parser instead of running. Python
blocks must compile, and the names they import from arpg_hf, diffusers, transformers and torch must exist.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # not in the fast run (-m 'not slow'): runs the README's commands, ~25 s

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
FIRST_SCREEN_LINES = 25
TEST_COMMAND = 'pip install -e ".[test]" && HF_HUB_OFFLINE=1 python -m pytest tests -q'
FIGURE_SCRIPT = REPO / "docs" / "figures" / "make_readme_figures.py"
# Folders whose scripts import a sibling as `python folder/script.py` allows (the script's folder comes first).
SCRIPT_FOLDERS = ("benchmarks", "pipelines", "conversion", "space", "docs/figures")
REPO_PREFIXES = ("benchmarks/", "pipelines/", "conversion/", "configs/", "docs/", "space/", "src/", "tests/")
CHECKED_IMPORT_ROOTS = ("arpg_hf", "diffusers", "transformers", "torch", "PIL")
COMMAND_STARTS = ("python ", "python3 ", "arpg-hf ", "accelerate launch ", "HF_HUB_OFFLINE=1 python ", "bash ")


# ---------------------------------------------------------------------------------------------------- Markdown
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # what follows "test:" in the HTML comment just before the block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str | None:
        return self.marker.split(";")[0].strip() if self.marker else None

    @property
    def writes(self) -> list[str]:
        found = re.search(r"writes\s+(.*)", self.marker or "")
        return found.group(1).split() if found else []


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, text) outside code blocks


FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")


def parse_page(path: Path) -> Page:
    page, lines = Page(path), path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            page.prose.append((index + 1, lines[index]))
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, end = [], index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[0] * len(fence)):
            body.append(lines[end][indent:] if lines[end][:indent].strip() == "" else lines[end])
            end += 1
        previous = next((lines[k] for k in range(index - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        page.blocks.append(Block(path, index + 1, opening["lang"], "\n".join(body), marker and marker.group(1)))
        index = end + 1
    return page


PARSED = {path: parse_page(path) for path in PAGES}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts with its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    slugs, counts = set(), {}
    for _, line in (PARSED[path] if path in PARSED else parse_page(path)).prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_slug(heading.group(1))
            slugs.add(slug if slug not in counts else f"{slug}-{counts[slug]}")  # GitHub numbers repeated headings
            counts[slug] = counts.get(slug, 0) + 1
    return slugs


def paragraphs(page: Page) -> list[tuple[int, str]]:
    """Runs of non-blank prose lines, joined by spaces (inline code can wrap), with their first line number."""
    runs, current, start = [], [], 0
    for number, line in [*page.prose, (0, "")]:
        if line.strip() and not MARKER.match(line):
            start = start if current else number
            current.append(line.strip())
        elif current:
            runs.append((start, " ".join(current)))
            current = []
    return runs


def links(page: Page) -> list[tuple[int, str]]:
    found = []
    for number, text in paragraphs(page):
        text = re.sub(r"`[^`]*`", "", text)  # code is not a link
        found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)]
        found += [(number, target) for target in re.findall(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", text)]
    return found


# ---------------------------------------------------------------------------------------------------- commands
@dataclass
class Command:
    where: str
    tokens: list[str]
    env: dict[str, str]
    mention: bool = False  # inline code in prose: often part of a command, so only its options are checked

    @property
    def text(self) -> str:
        return shlex.join(self.tokens)


def split_commands(code: str, where: str, mention: bool = False) -> list[Command]:
    """The commands of a bash snippet: continuation lines joined, comments dropped, `&&` and `;` separate."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        part: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", ";", "||"):
                env = {}
                while part and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", part[0]):
                    name, value = part.pop(0).split("=", 1)
                    env[name] = value
                if part:
                    commands.append(Command(where, part, env, mention))
                part = []
            else:
                part.append(token)
    return commands


def is_placeholder(token: str) -> bool:
    return (
        any(mark in token for mark in ("[", "]", "|", "(", ")", "...", "$"))
        or re.fullmatch(r"[A-Z][A-Z0-9_]*", token) is not None
    )


def extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return set(config["options.extras_require"])


def names_placeholder(path: str) -> bool:
    return any(is_placeholder(part) for part in Path(path).with_suffix("").parts)


def check_paths(command: Command) -> list[str]:
    problems = []
    for token in command.tokens:
        for value in token.strip("[]()").split("=")[-1:]:
            if value.startswith(REPO_PREFIXES) and not names_placeholder(value) and not (REPO / value).exists():
                problems.append(f"{value} does not exist")
    return problems


def plan(command: Command) -> tuple[list[str], dict | None]:
    """Checks what can be checked here; returns (problems, a job for the parser helper or None)."""
    tokens, problems = command.tokens, check_paths(command)
    program, args = tokens[0], tokens[1:]
    if program == "pip":
        if args[:1] != ["install"]:
            return problems + [f"unexpected pip command {command.text}"], None
        for requirement in args[1:]:
            named = re.fullmatch(r"(?:\.|arpg-hf)\[([\w,-]+)\]", requirement)
            unknown = set(named.group(1).split(",")) - extras() if named else set()
            problems += [f"setup.cfg has no extra {sorted(unknown)}"] if unknown else []
        return problems, None
    if program == "arpg-hf":
        return problems, {"kind": "cli", "argv": args, "mention": command.mention}
    if program in ("python", "python3"):
        if args[:2] == ["-m", "arpg_hf"]:
            return problems, {"kind": "cli", "argv": args[2:], "mention": command.mention}
        if args[:2] == ["-m", "pytest"]:
            return problems, None
        if args[:1] == ["-c"]:
            try:
                compile(args[1], command.where, "exec")
            except SyntaxError as error:
                problems.append(f"python -c: {error}")
            return problems, None
        if args and args[0].endswith(".py") and names_placeholder(args[0]):
            return problems, None  # `python pipelines/SCRIPT.py`
        if not args or not args[0].endswith(".py") or not (REPO / args[0]).is_file():
            return problems + [f"no script {args[:1]} in the repository"], None
        return problems, {"kind": "script", "script": args[0], "argv": args[1:], "mention": command.mention}
    if program == "accelerate":
        if args[:1] == ["config"]:
            return problems, None
        if args[:1] == ["launch"]:
            return problems, {"kind": "accelerate", "argv": args[1:], "mention": command.mention}
    if program == "bash":
        return problems + ([] if args and (REPO / args[0]).is_file() else [f"no script {args[:1]}"]), None
    if tokens[:3] == ["hf", "auth", "login"]:
        return problems, None
    return problems + [f"unknown command {command.text!r}"], None


def documented_commands() -> tuple[list[Command], list[Block]]:
    """Every command of the README and docs (fenced bash blocks and inline code), and the blocks to run."""
    commands, runnable = [], []
    for page in PARSED.values():
        for block in page.blocks:
            if block.lang in ("bash", "sh", "shell"):
                commands += split_commands(block.code, block.where)
            if block.kind in ("offline", "setup"):
                runnable.append(block)
        for number, text in paragraphs(page):
            for code in re.findall(r"`([^`]+)`", text):
                if code.startswith(COMMAND_STARTS):
                    commands += split_commands(code, f"{page.path.relative_to(REPO)}:{number}", mention=True)
    return commands, runnable


# ---------------------------------------------------------------------------------------------------- the helper
class _ParserFound(BaseException):
    def __init__(self, parser):
        self.parser = parser


def _capture_parser(run) -> argparse.ArgumentParser:
    """The first parser that `run()` asks to parse its arguments (the script stops there)."""
    original = argparse.ArgumentParser.parse_known_args

    def hand_over(self, *args, **kwargs):
        raise _ParserFound(self)

    argparse.ArgumentParser.parse_known_args = hand_over
    saved_argv = sys.argv
    try:
        run()
    except _ParserFound as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
    raise LookupError("it ran to the end without parsing any arguments")


def _check_argv(parser: argparse.ArgumentParser, argv: list[str], name: str, whole: bool = True) -> list[str]:
    """Unknown options of `argv` (subcommands followed), and when `whole` and it has no placeholder, argparse's own
    verdict on the whole command line."""
    problems, current = [], parser
    for token in argv:
        subcommands = [action for action in current._actions if isinstance(action, argparse._SubParsersAction)]
        if subcommands and token in subcommands[0].choices:
            current = subcommands[0].choices[token]
        option = token.strip("[]()").split("=")[0]
        if option.startswith("--") and option not in current._option_string_actions:
            problems.append(f"{name} has no option {option}")
    if whole and not problems and not any(is_placeholder(token) for token in argv):
        messages = io.StringIO()
        try:
            with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit:
            problems.append(f"{name}: {messages.getvalue().strip().splitlines()[-1]}")
    return problems


def _helper(jobs_path: str, results_path: str) -> None:
    """Runs in its own process: checks every job's arguments with the parser of the script it names."""
    from accelerate.commands.launch import launch_command_parser

    jobs, parsers, results = json.loads(Path(jobs_path).read_text()), {}, []

    def parser_of(script: str):
        if script not in parsers:
            try:
                if script == "arpg-hf":
                    parsers[script] = _capture_parser(lambda: runpy.run_module("arpg_hf", run_name="__main__"))
                else:
                    sys.argv = [script]
                    parsers[script] = _capture_parser(lambda: runpy.run_path(script, run_name="__main__"))
            except BaseException as error:  # a script that fails to start: reported as the job's problem
                parsers[script] = f"{script} could not be inspected: {type(error).__name__}: {error}"
        return parsers[script]

    for job in jobs:
        problems, script, argv, whole = [], job.get("script", "arpg-hf"), job["argv"], not job["mention"]
        if job["kind"] == "accelerate":
            at = next((index for index, token in enumerate(argv) if token.endswith(".py")), None)
            launcher = [
                "0" if token.startswith("$") else token for token in argv[: len(argv) if at is None else at + 1]
            ]
            problems += _check_argv(launch_command_parser(), launcher, "accelerate launch", whole and at is not None)
            if at is None and whole:
                problems.append("accelerate launch names no script")
            script, argv = (None, []) if at is None else (argv[at], argv[at + 1 :])
            problems += [] if script is None or Path(script).is_file() else [f"no script {script}"]
        if script and not problems:
            parser = parser_of(script)
            problems += [parser] if isinstance(parser, str) else _check_argv(parser, argv, script, whole)
        results.append(problems)
    Path(results_path).write_text(json.dumps(results))


def run_helper(jobs: list[dict]) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as folder:
        jobs_path, results_path = Path(folder, "jobs.json"), Path(folder, "results.json")
        jobs_path.write_text(json.dumps(jobs))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *(str(REPO / f) for f in SCRIPT_FOLDERS)]))
        process = subprocess.run(
            [sys.executable, str(Path(__file__)), "--check-commands", str(jobs_path), str(results_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert process.returncode == 0, process.stderr[-3000:]
        return json.loads(results_path.read_text())


def run_block(block: Block) -> list[str]:
    """Runs a bash block as its reader would, in a temporary folder; returns the problems found."""
    problems = []
    with tempfile.TemporaryDirectory() as folder:
        for command in split_commands(block.code, block.where):
            if command.tokens[0] == "pip" or command.tokens[:3] == ["python", "-m", "pytest"]:
                continue  # installing is checked by `plan`; the test command is this suite
            if command.tokens[0] == "arpg-hf":
                argv = [sys.executable, "-m", "arpg_hf", *command.tokens[1:]]
            elif command.tokens[:2] == ["python", "-c"]:
                argv = [sys.executable, *command.tokens[1:]]
            else:
                problems.append(f"{block.where}: cannot run {command.text!r} here")
                continue
            env = dict(os.environ, HF_HUB_OFFLINE="1", **command.env)
            process = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
            if process.returncode != 0:
                problems.append(f"{block.where}: {command.text!r} failed:\n{process.stderr[-2000:]}")
                break
        problems += written_problems(block, Path(folder))
    return problems


def written_problems(block: Block, folder: Path) -> list[str]:
    missing = [name for name in block.writes if not (folder / name).is_file()]
    stray = sorted(path.name for path in folder.iterdir() if path.name != "outputs")
    return [f"{block.where}: promised {name} was not written" for name in missing] + [
        f"{block.where}: wrote {name} outside outputs/" for name in stray
    ]


# ---------------------------------------------------------------------------------------------------- tests
@dataclass
class Background:
    commands: list[Command]
    local_problems: list[list[str]]  # per command: what `plan` found
    job_index: list[int | None]  # per command: its job for the helper
    helper: object  # future: the helper's problems per job
    runs: list  # futures: the problems of each runnable bash block


@pytest.fixture(scope="module", autouse=True)
def background():
    """Starts the slow parts at once, each in a thread: the parser helper, and every runnable bash block."""
    commands, runnable = documented_commands()
    local, job_index, jobs = [], [], []
    for command in commands:
        problems, job = plan(command)
        local.append(problems)
        job_index.append(len(jobs) if job else None)
        jobs += [job] if job else []
    bash_blocks = [block for block in runnable if block.lang in ("bash", "sh", "shell")]
    pool = ThreadPoolExecutor(max_workers=1 + len(bash_blocks))
    helper = pool.submit(run_helper, jobs)
    runs = [pool.submit(run_block, block) for block in bash_blocks]
    yield Background(commands, local, job_index, helper, runs)
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    problems = []
    for number, target in links(PARSED[page]):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or REPO not in [resolved, *resolved.parents]:
            problems.append(f"{page.name}:{number}: {target} does not exist in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{page.name}:{number}: {target}: no heading #{anchor} in {resolved.name}")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_opens_with_a_picture():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"
    first_screen = "\n".join(lines[:FIRST_SCREEN_LINES])
    pictures = re.findall(r"<img\b[^>]*?src=\"([^\"]+)\"", first_screen)
    pictures += re.findall(r"!\[[^\]]*\]\(([^)\s]+)", first_screen)
    assert [picture for picture in pictures if (REPO / picture).is_file()], (
        f"no picture of an existing file in the first {FIRST_SCREEN_LINES} lines of README.md: {pictures}"
    )


def test_readme_set_up_and_quick_start_are_marked():
    blocks = PARSED[README].blocks
    setup = [block for block in blocks if block.kind == "setup"]
    assert len(setup) == 1 and setup[0].writes, "the set-up block needs <!-- test: setup; writes ... -->"
    assert TEST_COMMAND in setup[0].code.splitlines(), "CI runs the README's test command: keep it exactly"
    install = setup[0].code.splitlines()[0]
    assert "pip install -e ." in install and "arpg-hf " in install, "the first set-up command installs and runs"
    offline = {block.lang for block in blocks if block.kind == "offline"}
    assert {"python", "bash"} <= offline, "the README's offline quick start has a Python and a command-line block"


def test_readme_commands_write_under_outputs():
    assert "outputs/" in (REPO / ".gitignore").read_text().split()
    commands = [command for command in documented_commands()[0] if command.where.startswith("README.md")]
    folders = [
        (command.where, tokens[1])
        for command in commands
        for tokens in zip(command.tokens, command.tokens[1:])
        if tokens[0] in ("--output-dir", "--output_dir")
    ]
    assert folders and all(folder.startswith("outputs/") for _, folder in folders), folders


OFFLINE_PYTHON = [block for page in PARSED.values() for block in page.blocks if block.kind == "offline"]
OFFLINE_PYTHON = [block for block in OFFLINE_PYTHON if block.lang == "python"]


@pytest.mark.parametrize("block", OFFLINE_PYTHON, ids=lambda block: block.where)
def test_offline_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
    assert not written_problems(block, tmp_path)


def test_python_blocks_compile_and_import_real_names():
    problems = []
    for block in [block for page in PARSED.values() for block in page.blocks if block.lang == "python"]:
        try:
            tree = ast.parse(block.code)
        except SyntaxError as error:
            problems.append(f"{block.where}: {error}")
            continue
        for node in ast.walk(tree):
            names = [(node.module, alias.name) for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            names += [(alias.name, None) for alias in node.names] if isinstance(node, ast.Import) else []
            for module, name in names:
                if not module or module.split(".")[0] not in CHECKED_IMPORT_ROOTS:
                    continue
                try:
                    imported = importlib.import_module(module)
                    if name is not None:
                        getattr(imported, name)
                except (ImportError, AttributeError) as error:
                    problems.append(f"{block.where}: {type(error).__name__}: {error}")
    assert not problems, "\n".join(problems)


def test_documented_commands_name_real_scripts_and_options(background):
    helper_problems = background.helper.result(timeout=600)
    problems = []
    for command, local, index in zip(background.commands, background.local_problems, background.job_index):
        found = local + (helper_problems[index] if index is not None else [])
        problems += [f"{command.where}: {command.text}\n    {problem}" for problem in found]
    assert len(background.commands) > 40, "the command extraction found too few commands"
    assert not problems, "\n".join(problems)


def test_offline_bash_blocks_run_as_written(background):
    problems = [problem for run in background.runs for problem in run.result(timeout=600)]
    assert not problems, "\n".join(problems)


def test_readme_figure_script_runs(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(sys, "argv", [str(FIGURE_SCRIPT), "--output-dir", str(tmp_path)])
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(str(FIGURE_SCRIPT), run_name="__main__")
    for name in ("digits_by_class.png", "decoding_steps.png"):
        with Image.open(tmp_path / name) as made, Image.open(REPO / "docs" / "images" / name) as committed:
            assert made.size == committed.size, name


if __name__ == "__main__" and sys.argv[1:2] == ["--check-commands"]:
    _helper(sys.argv[2], sys.argv[3])
