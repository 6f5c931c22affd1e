"""Command-line flags for any config dataclass: `--field value` for every field, plus `--preset`.

Every field of the dataclass becomes a flag of the same name. Types come from the annotations:
int, float, str, bool (`--field true|false`), `Optional[...]` (`none` gives None) and `Literal[...]`
(the choices are checked). Help text comes from `field(metadata={"help": ...})`. An unknown flag, a
value of the wrong type, a bad choice or a config that fails its `validate()` exits with code 2
and one line naming the flag or value (argparse's convention).
"""

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Type, TypeVar

from utils.launch import report

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage dump) and exits with code 2."""

    def error(self, message: str):
        sys.exit(report(f"{self.prog}: error: {message} (see --help)", 2))


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """argparse type for a float flag: inf and nan are refused (they would sample black images)."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


finite_float.__name__ = "float"  # argparse names the type in its errors and metavars


def _unwrap_optional(tp: Any):
    """Return (inner type, is_optional) for Optional[X]; (tp, False) otherwise."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    """An argparse `type=` callable and the list of choices (or None) for a field annotation."""
    inner, optional = _unwrap_optional(tp)
    choices = None
    if typing.get_origin(inner) is typing.Literal:
        choices = list(typing.get_args(inner))
        base = type(choices[0])
    else:
        base = inner
    if base is bool:
        convert = _parse_bool
    elif base in (int, float, str):
        convert = base
    else:
        raise TypeError(f"config fields of type {tp!r} are not supported by the CLI helper")

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = convert(text)
        except argparse.ArgumentTypeError:
            if base is bool and optional:
                raise argparse.ArgumentTypeError(f"expected true, false or none, got {text!r}") from None
            raise
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})")
        return value

    parse.__name__ = getattr(base, "__name__", "value")
    return parse, choices


def field_choices(config_cls: Type, name: str) -> Optional[list]:
    """The allowed values of a Literal field, or None when the field is free."""
    hints = typing.get_type_hints(config_cls, include_extras=False)
    return _converter(hints[name])[1]


def build_parser(config_cls: Type, presets: Mapping[str, Mapping[str, Any]],
                 description: str, default_preset: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets),
                        help="named set of defaults applied before the other flags")
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        parse, choices = _converter(hints[f.name])
        help_text = f.metadata.get("help", "")
        if choices is not None:
            help_text = f"{help_text} {{{'|'.join(map(str, choices))}}}".strip()
        # SUPPRESS: a flag that is not given is absent, so a given `none` overrides a preset's value.
        parser.add_argument(f"--{f.name}", type=parse, default=argparse.SUPPRESS, metavar=parse.__name__.upper(),
                            help=f"{help_text} (default: {getattr(defaults, f.name)!r})")
    return parser


def parse_config(config_cls: Type[T], presets: Mapping[str, Mapping[str, Any]],
                 argv: Optional[Sequence[str]] = None, description: str = "",
                 default_preset: Optional[str] = None,
                 resolve: Optional[Callable[[Dict[str, Any], Set[str]], None]] = None) -> T:
    """Build a config from `--preset NAME` (applied first) and `--field value` flags.

    `resolve(values, given)` may fill in, in place, the fields whose value follows from others
    (every field's value, after the preset and flags; `given` = the flags on the command line)
    before the config is built and validated once.
    """
    default_preset = default_preset or next(iter(presets))
    parser = build_parser(config_cls, presets, description or config_cls.__doc__ or "", default_preset)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    values: Dict[str, Any] = dataclasses.asdict(config_cls())
    values.update(presets[preset])
    values.update(args)
    if resolve is not None:
        resolve(values, set(args))
    try:
        return make_config(config_cls, values)
    except ValueError as err:
        parser.error(str(err))


def make_config(config_cls: Type[T], values: Mapping[str, Any]) -> T:
    """Instantiate and validate a config from a mapping; unknown keys are a ValueError."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s): {', '.join(unknown)}")
    config = config_cls(**values)
    check_choices(config)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def check_choices(config: Any) -> None:
    """Literal fields must hold one of their choices, however the config was built."""
    for f in dataclasses.fields(config):
        choices = field_choices(type(config), f.name)
        value = getattr(config, f.name)
        if choices is not None and value not in choices and value is not None:
            raise ValueError(f"--{f.name} {value!r} is not one of {', '.join(map(str, choices))}")


def format_config(config: Any) -> str:
    """One `name = value` line per field, for printing the resolved config."""
    items = dataclasses.asdict(config)
    width = max(map(len, items))
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in items.items())
