"""The README and the docs/ pages stay true to the code: every relative link resolves (to a file, and to a
heading where it names one), and every command their code blocks run still parses its flags."""

import importlib
import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT

import generate
import train
from bitfit.cli import ArgumentParser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NOT_OURS = ("python -m pip", "python -m pytest", "python -m venv")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # a "# comment" in code is no heading
    return {slug(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_readme_is_a_front_door_and_the_rest_is_in_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"the README does not link to docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert broken == []


def commands() -> list[tuple[str, str]]:
    """(page, command) for every python or torchrun command in the pages' code blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith(("python ", "torchrun ")) and not line.startswith(NOT_OURS):
                    found.append((page.name, line))
    return found


class Parsed(Exception):
    """Raised once a command's flags have parsed: the dry check stops there, before anything runs."""


def entry_point(words: list[str]):
    """The main function a command line runs, and its arguments."""
    if words[0] == "torchrun":  # torchrun's own flags, then the script and its flags
        script = next(index for index, word in enumerate(words) if word.endswith(".py"))
        words = ["python", *words[script:]]
    if words[1] == "-m":
        return importlib.import_module(words[2]).main, words[3:]
    return {"train.py": train.main, "generate.py": generate.main}[words[1]], words[2:]


@pytest.mark.parametrize("page, command", commands(), ids=[f"{page}: {command[:60]}" for page, command in commands()])
def test_every_command_shown_parses_its_flags(page, command, monkeypatch):
    words = []
    for word in shlex.split(command, comments=True):
        if word != "...":
            words.append(word)
        elif words[-1].startswith("--"):  # "--data ...": a value left out
            words.append("X")
        # else "...": more flags left out
    main, argv = entry_point(words)
    parse_args = ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)  # a flag it does not know exits with status 2 here
        raise Parsed

    monkeypatch.setattr(ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        main(argv)


def test_the_dry_check_catches_a_flag_that_is_gone(monkeypatch):
    with pytest.raises(SystemExit) as stop:
        test_every_command_shown_parses_its_flags("README.md", "python train.py --mode bitfit --no-such-flag",
                                                   monkeypatch)
    assert stop.value.code == 2
