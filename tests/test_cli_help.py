"""Every subcommand says what it does and every option what it is for, in ``--help`` and in the
README's list of commands."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from conftest import REPO

from llamabind.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    ap = build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_a_summary_and_a_description():
    ap = build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, p in subcommands().items():
        assert summaries.get(name), f"{name} has no one-line help in the command list"
        assert p.description and len(p.description) > 40, f"{name} --help has no description"


def test_every_option_has_a_help_text():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in subcommands().items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, missing


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "llamabind", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in subcommands():
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), f"{name} missing from --help:\n{out.stdout}"


def test_readme_and_cli_docs_name_every_command():
    """The front page's list of commands and docs/cli.md's sections follow the parser."""
    names = set(subcommands())
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"python -m llamabind ((?:\w+\|)+\w+)", readme)
    assert listed and set(listed.group(1).split("|")) == names, listed and listed.group(1)
    cli_doc = (REPO / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"^## `(\w+)`", cli_doc, re.M))
    assert documented == names, documented ^ names


def test_model_help_names_the_model_each_command_uses():
    """chat and serve run the chat model without -m, embed the embedding model: none says gemma3-270m."""
    for name, p in subcommands().items():
        models = [a for a in p._actions if "--model" in a.option_strings]
        assert models or name == "info"
        for m in models:
            assert ("gemma3-270m" in m.help) == (name in ("generate", "bench")), f"{name}: {m.help}"
