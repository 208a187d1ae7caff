"""argparse's errors in growlm's shape: one line, ``growlm: error: --flag: why``, exit code 2, never a usage
block; a bad value of a choice flag lists the valid ones, read from the registry when the value is checked."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from growlm.cli import build_parser, main


def choice_arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                                     argparse.Action]]:
    """Every argument of the CLI that takes one of a set of values (sub-commands included), with the
    sub-command words that reach it."""
    for action in parser._actions:
        if action.choices is None:
            continue
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from choice_arguments(sub, (*path, name))


def name(action: argparse.Action) -> str:
    """How an error names the argument: its flag, or its metavar."""
    return action.option_strings[0] if action.option_strings else action.metavar or action.dest


CHOICES = [(path, name(action)) for path, action in choice_arguments(build_parser())]


def error_of(argv: list[str], capsys) -> str:
    """What ``growlm ARGV`` prints on stderr; it must exit with code 2 on argparse's side."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_every_choice_argument_is_covered():
    # the walk finds the choice flags a reader knows of, so the test below cannot pass by finding none
    assert {(" ".join(p), f) for p, f in CHOICES} >= {("", "COMMAND"), ("substrate", "SUBCOMMAND"),
                                                      ("substrate build", "--kind"), ("eval", "--task"),
                                                      ("eval", "--protocol"), ("merge", "--combine"),
                                                      ("merge", "--weighted-space"), ("export", "--to")}


@pytest.mark.parametrize(("path", "flag"), CHOICES, ids=[" ".join((*p, f)) for p, f in CHOICES])
def test_a_bad_choice_is_one_line_naming_the_valid_ones(path, flag, capsys):
    action = next(a for p, a in choice_arguments(build_parser()) if (p, name(a)) == (path, flag))
    argv = [*path, *([flag] if flag.startswith("-") else []), "no-such-value"]
    assert error_of(argv, capsys) == (f"growlm: error: {flag}: invalid choice 'no-such-value'; choose one of: "
                                      f"{', '.join(action.choices)}\n")


def test_the_choices_are_the_registries(capsys):
    from growlm.evaluation.tasks import TASKS
    from growlm.rules import RULES
    from growlm.substrate.registry import SUBSTRATE_KINDS, Params, registered

    class NoParams(Params):
        pass

    with registered("toy-kind", lambda vocab, *, dim: None, NoParams):
        err = error_of(["substrate", "build", "--kind", "pixels", "--dim", "8", "--out", "x"], capsys)
    assert err == f"growlm: error: --kind: invalid choice 'pixels'; choose one of: " \
                  f"{', '.join(SUBSTRATE_KINDS.names())}, toy-kind\n"
    assert error_of(["eval", "m", "--task", "mmlu-pro"], capsys) == \
        f"growlm: error: --task: invalid choice 'mmlu-pro'; choose one of: {', '.join(TASKS.names())}\n"
    # router is a rule, but a trained one: it is asked for with --router, and the choices leave it out
    assert error_of(["merge", "a", "b", "--out", "m", "--combine", "router"], capsys) == \
        "growlm: error: --combine: invalid choice 'router'; choose one of: " \
        f"{', '.join(n for n in RULES.names() if not RULES[n].trained)}\n"


@pytest.mark.parametrize(("argv", "error"), [
    ([], "the following arguments are required: COMMAND"),
    (["substrate"], "the following arguments are required: SUBCOMMAND"),
    (["substrate", "build", "--kind", "binary", "--dim", "x"], "--dim: invalid int value: 'x'"),
    (["eval", "m"], "the following arguments are required: --task"),
    (["verify", "m", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_every_usage_error_is_one_line(argv, error, capsys):
    assert error_of(argv, capsys) == f"growlm: error: {error}\n"
