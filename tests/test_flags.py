"""cnx.flags: one flag per dataclass field, and a boolean flag means the same in every command."""

from dataclasses import dataclass

import pytest

from cnx import flags
from cnx.flags import flag


@dataclass(frozen=True)
class Example:
    on: bool = flag(False, "off unless asked")
    kept: bool = flag(True, "on unless refused")
    rate: float = flag(1e-5, "a float")
    steps: int | None = flag(None, "an optional int")
    kind: str = flag("a", "a choice", ("a", "b"))


def parse(argv):
    return Example(**vars(flags.build_parser(Example, "example", "").parse_args(argv)))


@pytest.mark.parametrize(
    "argv, on, kept",
    [
        ([], False, True),
        (["--on", "--no_kept"], True, False),
        (["--on=true", "--kept=false"], True, False),
        (["--on", "True", "--kept", "0"], True, False),
        (["--on", "--no_on", "--kept=yes"], False, True),  # the last one given wins
    ],
)
def test_booleans_are_a_flag_a_no_flag_or_an_explicit_value_whatever_their_default(argv, on, kept):
    parsed = parse(argv)
    assert (parsed.on, parsed.kept) == (on, kept)


def test_values_are_typed_and_bad_ones_refused_in_one_line():
    assert parse(["--rate=3e-4", "--steps", "7", "--kind=b"]) == Example(rate=3e-4, steps=7, kind="b")
    for argv, message in [
        (["--on=maybe"], "--on: expected true or false, got 'maybe'"),
        (["--steps=many"], "--steps: invalid int value: 'many'"),
        (["--kind=c"], "--kind: invalid choice: 'c'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(argv)


@pytest.mark.parametrize("changed_only", [True, False])
def test_as_argv_gives_back_the_values(changed_only):
    values = Example(on=True, kept=False, rate=1 / 3, steps=4, kind="b")
    assert parse(flags.as_argv(values, changed_only)) == values
    assert flags.as_argv(Example()) == []


def test_every_command_built_from_a_dataclass_reads_booleans_alike():
    """`cnx train`, `cnx plan-memory` and `cnx pretrain-tiny` share the parser: same words, same value."""
    from cnx import memory, options, pretrain

    train = options.build_parser()
    plan = memory.build_parser()
    pretrain_tiny = pretrain.build_parser()
    for parser, name, default, required in [
        (train, "gradient_checkpointing", False, []),
        (plan, "gradient_checkpointing", True, []),
        (pretrain_tiny, "bf16", True, ["out"]),
    ]:
        for argv, value in [([], default), ([f"--{name}"], True), ([f"--no_{name}"], False)]:
            assert getattr(parser.parse_args([*required, *argv]), name) is value, (parser.prog, argv)
        assert getattr(parser.parse_args([*required, f"--{name}=false"]), name) is False
