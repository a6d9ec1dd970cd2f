"""Typed, nested configuration with a generated command line.

A configuration is a dataclass of *sections*; a section is a dataclass of fields declared with `option(...)`, which
holds everything about a setting in one place: default, help, unit, allowed values (a callable that reads a
registry, so choices are never a second hard-coded list), bounds, whether it is frozen on resume, and its flag.

    @dataclass
    class Optim:
        lr: float = option(1e-4, "peak learning rate", lower=0.0, lower_open=True)

The same code turns flags, config files and recipes into a validated instance (`from_dict`); a bad value anywhere
is one `UsageError` naming the field, its flag and the allowed values. Why our own ~200 lines instead of tyro,
jsonargparse or simple-parsing: none of them is installed with this stack; we need argparse's exact behaviour
for DeepSpeed's launcher (`--local_rank`), one-line errors with exit code 2, and precedence across recipe, file
and flags, which these libraries each do differently.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterator

from data.cli import UsageError

_MISSING = dataclasses.MISSING


def option(default: Any, help: str | Callable[[], str], *, unit: str = "",
           choices: Callable[[], typing.Iterable[Any]] | None = None,
           lower: float | None = None, upper: float | None = None, lower_open: bool = False,
           upper_open: bool = False, frozen: bool = False, flag: str | None = None,
           metavar: str | None = None) -> Any:
    """A configuration field. `choices` is called when needed (so it can read a registry); `lower`/`upper` bound
    numbers (open with `*_open`); `frozen` fields must not change when a run resumes; `flag` overrides the derived
    `--field-name`."""
    meta = dict(help=help, unit=unit, choices=choices, lower=lower, upper=upper, lower_open=lower_open,
                upper_open=upper_open, frozen=frozen, flag=flag, metavar=metavar)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of one section, as seen by the CLI generator and the validator."""
    section: str
    name: str
    type: Any
    default: Any
    meta: dict

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.path.replace(".", "__")


def settings(cls: type, section: str = "") -> Iterator[Setting]:
    """Every leaf field of a (nested) config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from settings(t, f"{section}.{f.name}" if section else f.name)
        elif f.metadata.get("help") is not None:
            default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
            yield Setting(section, f.name, t, default, dict(f.metadata))


# ------------------------------------------------------------------------------------------- values


def _base_type(t: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `float` -> (float, False)."""
    args = typing.get_args(t)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return t, False


def _describe(s: Setting) -> str:
    return f"{s.path} ({s.flag})"


def convert(s: Setting, value: Any) -> Any:
    """A value from a flag (string) or JSON (any) -> the field's type; UsageError naming the field otherwise."""
    base, optional = _base_type(s.type)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "")):
        if optional:
            return None
        raise UsageError(f"{_describe(s)}: a value is required")
    try:
        if base is bool:
            if isinstance(value, str):
                v = value.strip().lower()
                if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError
                return v in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            kinds = typing.get_args(base)
            if len(items) != len(kinds):
                raise ValueError
            return tuple(k(v) for k, v in zip(kinds, items))
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise TypeError(f"{s.path}: unsupported field type {s.type}")
    raise UsageError(f"{_describe(s)}: {value!r} is not {_type_name(s.type)}")


def _type_name(t: Any) -> str:
    base, optional = _base_type(t)
    if typing.get_origin(base) is tuple:
        name = "a comma-separated pair of numbers"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    return name + (" or none" if optional else "")


def check(s: Setting, value: Any) -> None:
    """Allowed values and bounds of one field (None passes for optional fields)."""
    if value is None:
        return
    m = s.meta
    if m.get("choices") is not None:
        allowed = list(m["choices"]())
        if value not in allowed:
            raise UsageError(f"{_describe(s)}: {value!r} is not one of {', '.join(map(str, allowed))}")
    lo, hi = m.get("lower"), m.get("upper")
    if lo is not None and (value < lo or (m.get("lower_open") and value == lo)):
        raise UsageError(f"{_describe(s)}: {value!r} must be {'>' if m.get('lower_open') else '>='} {lo}")
    if hi is not None and (value > hi or (m.get("upper_open") and value == hi)):
        raise UsageError(f"{_describe(s)}: {value!r} must be {'<' if m.get('upper_open') else '<='} {hi}")


# ------------------------------------------------------------------------------------------- dicts


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-JSON dict of a config instance (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dict `src` into `dst` in place (sections merge, values replace); returns `dst`."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def from_dict(cls: type, d: dict[str, Any], _section: str = "") -> Any:
    """Nested dict (any subset of the fields) -> validated instance of `cls`; unknown keys and bad values raise
    UsageError naming the field."""
    if not isinstance(d, dict):
        raise UsageError(f"configuration: section {_section or '(top)'} must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        known = ", ".join(sorted(names))
        prefix = f"{_section}." if _section else ""
        raise UsageError(f"unknown setting {prefix}{unknown[0]}; {_section or 'the top level'} has {known}")
    kw: dict[str, Any] = {}
    by_name = {s.name: s for s in settings(cls, _section) if s.section == _section}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        path = f"{_section}.{f.name}" if _section else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = from_dict(hints[f.name], d[f.name], path)
        elif f.name not in by_name:  # a plain field without option(): recorded, not a setting
            kw[f.name] = d[f.name]
        else:
            kw[f.name] = convert(by_name[f.name], d[f.name])
            check(by_name[f.name], kw[f.name])
    return cls(**kw)


def frozen_changes(cls: type, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Flags of the frozen fields whose values differ between two nested config dicts."""
    changed = []
    for s in settings(cls):
        a, b = old, new
        for part in s.path.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if s.meta.get("frozen") and a != b:
            changed.append(s.flag)
    return changed


# ------------------------------------------------------------------------------------------- CLI


def _help_text(s: Setting) -> str:
    """help [unit] (default: D; frozen on resume), with argparse's % escaped; `help` may be a callable."""
    h = s.meta["help"]
    parts = [h() if callable(h) else h]
    if s.meta.get("unit"):
        parts.append(f"[{s.meta['unit']}]")
    shown = ",".join(map(str, s.default)) if isinstance(s.default, tuple) else s.default
    notes = ([f"default: {shown}"] if shown not in ("", None) else []) + (["frozen on resume"] if s.meta.get("frozen")
                                                                          else [])
    if notes:
        parts.append(f"({'; '.join(notes)})")
    return " ".join(parts).replace("%", "%%")


def section_titles(cls: type, section: str, title: str) -> dict[str, str]:
    """{section path: --help group title} of a config dataclass and its nested sections (a nested section's title:
    `title: ` + the first line of its class docstring, else its name)."""
    out = {section: title}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            doc = (t.__doc__ or "").strip().splitlines()
            sub = f"{section}.{f.name}" if section else f.name
            out.update(section_titles(t, sub, f"{title}: {doc[0] if doc else f.name}"))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type, titles: dict[str, str], section: str = "",
              seen: dict[str, str] | None = None) -> None:
    """One argparse group per section; every flag's help shows its default, unit and allowed values. Defaults are
    SUPPRESSed so that only flags given on the command line override the recipe and the config file."""
    groups: dict[str, Any] = {}
    seen = {} if seen is None else seen
    for s in settings(cls, section):
        if s.flag in seen:
            raise TypeError(f"flag {s.flag} is declared by {seen[s.flag]} and {s.path}")
        seen[s.flag] = s.path
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(titles.get(s.section, s.section))
        text = _help_text(s)
        base, _ = _base_type(s.type)
        if base is bool:
            groups[s.section].add_argument(s.flag, dest=s.dest, action=argparse.BooleanOptionalAction,
                                           default=argparse.SUPPRESS, help=text)
        else:
            choices = s.meta.get("choices")
            metavar = s.meta.get("metavar") or ("{" + ",".join(map(str, choices())) + "}" if choices else
                                                {int: "N", float: "X"}.get(base, "STR"))
            groups[s.section].add_argument(s.flag, dest=s.dest, default=argparse.SUPPRESS, metavar=metavar,
                                           help=text)


def flags_to_dict(given: dict[str, Any], cls: type, section: str = "", nest: list[str] | None = None
                  ) -> dict[str, Any]:
    """The flags given on the command line (`vars()` of argparse's result) as a nested dict (raw strings;
    `from_dict` converts and checks). `nest` places a flat section's values (default: the dotted section path)."""
    out: dict[str, Any] = {}
    for s in settings(cls, section):
        if s.dest in given:
            node = out
            inner = s.section[len(section):].strip(".")  # a nested section's path below `section`
            parts = (nest + (inner.split(".") if inner else [])) if nest is not None else \
                (s.section.split(".") if s.section else [])
            for part in parts:
                node = node.setdefault(part, {})
            node[s.name] = given[s.dest]
    return out
