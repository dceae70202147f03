"""The documentation holds together: README.md stays short, every relative link in README.md and docs/*.md points at
a file that exists, and every `mdpo ...` command shown in a shell code block parses as `mdpo` itself would parse it
(`mdpo.cli.main`: `parse_known_args`, extra arguments only where the command takes them, `key=value` overrides and
Megatron-LM style flags through `translate_args`). In-process, no subprocess: a few seconds."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from mdpo.cli import build_parser
from mdpo.config import translate_args
from mdpo.errors import MdpoError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&"}
LAUNCHERS = {"torchrun", "python", "python3"}
TAKE_EXTRA = {"train", "precompute-ref", "eval"}  # main() hands them the arguments argparse did not know


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines with their numbers, code lines with their numbers and their block's language)."""
    prose: list[tuple[int, str]] = []
    code: list[tuple[int, str, str]] = []
    fence: str | None = None
    lang = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang = match.group(1), match.group(2).lower()
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            code.append((number, line, lang))
        else:
            prose.append((number, line))
    assert fence is None, f"{_rel(path)}: a code block is never closed"
    return prose, code


def _links() -> list[tuple[str, Path, str]]:
    found = []
    for page in PAGES:
        for number, line in _blocks(page)[0]:
            text = INLINE_CODE.sub("", line)
            targets = LINK.findall(text) + REFERENCE_LINK.findall(text)
            found += [(f"{_rel(page)}:{number}", page, target) for target in targets]
    return found


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `mdpo`) for every mdpo command line in a shell block: continuation lines joined, `VAR=value`
    prefixes and `torchrun ... -m` / `python -m` launchers dropped, `a && b` / `a; b` / `a | b` split."""
    found = []
    for page in PAGES:
        pending, start = "", 0
        for number, line, lang in _blocks(page)[1]:
            if lang not in SHELL:
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = pending + line, ""
            lexer = shlex.shlex(text.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
            segments: list[list[str]] = [[]]
            for token in tokens:
                if token in SEPARATORS:
                    segments.append([])
                else:
                    segments[-1].append(token)
            for words in segments:
                while words and ENV_PREFIX.match(words[0]):
                    words = words[1:]
                if words and words[0] in LAUNCHERS and "-m" in words:
                    words = words[words.index("-m") + 1 :]
                if words and words[0] == "mdpo":
                    found.append((f"{_rel(page)}:{start}: {text.strip()}", words[1:]))
    return found


def _parse(argv: list[str]) -> None:
    """What `mdpo.cli.main` does with argv before it runs anything; raises SystemExit or MdpoError as it would."""
    args, extra = build_parser().parse_known_args(argv)
    if args.command in ("train", "precompute-ref"):
        overrides = [*args.overrides, *extra]
        if args.config is not None and "=" in args.config and not os.path.exists(args.config):
            overrides = [args.config, *overrides]
        translate_args(overrides)
    elif args.command == "eval":
        translate_args([*args.overrides, *extra])
    elif extra:
        raise MdpoError(f"unexpected arguments for {args.command}: {' '.join(extra)}")


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_docs_exist_and_readme_maps_them():
    assert len(PAGES) > 1, "docs/*.md is missing"
    linked = {(ROOT / target.split("#")[0]).resolve() for where, page, target in _links() if page.name == "README.md"}
    unmapped = [_rel(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unmapped, f"README.md does not link these docs pages: {unmapped}"


@pytest.mark.parametrize(("where", "page", "target"), _links(), ids=lambda x: x if isinstance(x, str) else "")
def test_relative_link_resolves(where: str, page: Path, target: str):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
        return  # http(s), mailto: not checked here; an anchor on the same page is not a file
    path = (page.parent / target.split("#")[0]).resolve()
    assert path.exists(), f"{where}: link target {target} does not exist ({path})"


def test_commands_are_found():
    assert len(_commands()) >= 10, "fewer mdpo command lines than expected: is the block parser broken?"


@pytest.mark.parametrize(("where", "argv"), _commands(), ids=lambda x: x.split(": ")[0] if isinstance(x, str) else "")
def test_command_parses(where: str, argv: list[str]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            _parse(argv)
    except SystemExit as stop:
        assert stop.code in (0, None), f"{where}\n  does not parse: {stderr.getvalue().strip()}"
    except MdpoError as err:
        pytest.fail(f"{where}\n  is refused: {err}")
