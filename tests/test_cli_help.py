"""Every option of every `sidecar` command says what it is for in `--help` (issue 20, item 8).

The tree is walked from `cli.build_parser()`. `inspect`, `diagnose` and `bench` parse
their own arguments (cli.py hands them the rest of the line), so their parsers are caught
as each command's `main` is about to parse: `ArgumentParser.parse_args` is replaced for
the call by one that hands the parser back instead of parsing.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from sidecar import cli


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _delegated_parser(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Caught(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Caught) as caught:
            cli.main([command])
    return caught.value.parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _without_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            missing += [f"{parser.prog} {name}" for name in action.choices if name not in helped]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


def _every_parser(monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    own = list(_parsers(cli.build_parser()))
    delegated = [_delegated_parser(name, monkeypatch) for name in cli._DELEGATED]
    return own + delegated


def test_every_option_of_every_command_has_help(monkeypatch: pytest.MonkeyPatch) -> None:
    parsers = _every_parser(monkeypatch)
    progs = {p.prog for p in parsers}
    # The walk reaches every command, the delegated ones included.
    for command in ("run", "check", "demo", "pki init", "pki issue", "pki rotate",
                    *cli._DELEGATED):
        assert f"sidecar {command}" in progs, sorted(progs)
    missing = [name for p in parsers for name in _without_help(p)]
    assert missing == [], "options without --help text: " + ", ".join(missing)


def test_help_is_printed_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "check", "demo", "pki", "pki init", "pki issue", "pki rotate",
                    *cli._DELEGATED):
        code: object = None
        try:
            code = cli.main([*command.split(), "--help"])
        except SystemExit as exc:
            code = exc.code
        assert code == 0, command
        assert "usage: sidecar" in capsys.readouterr().out, command
