"""Loading configs: YAML <- dotted CLI overrides -> typed dataclasses, range checks, YAML out, --help rows.

The config dataclasses themselves are in kiln.config (which re-exports everything here); this module knows
nothing of them, so any layer's dataclass (a task's own config) loads the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any

import yaml

from kiln.errors import KilnError, did_you_mean

def _f(default, help: str, **meta):
    """A config field: its default, one line of help (--help is generated from it) and metadata such as
    range=">= 1" or choices=(...) (with several=True: a comma list of them)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp, where: str) -> Any:
    """Check/convert one value to the field type; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, str) and tp is list:  # --data.columns text,label
        value = [v.strip() for v in value.split(",")] if value.strip() else []
    if isinstance(value, str) and tp in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            number = float(value)
            value = int(number) if tp is int and number.is_integer() and "." not in value else number
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, list),
    }.get(tp, lambda v: True)
    if not ok(value):
        raise KilnError(f"{where}: {key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float:
        value = float(value)
    if tp is str:
        value = str(value)
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def update_dataclass(obj, values: dict, prefix: str = "", where: str = "config", given=frozenset()) -> None:
    """Set `values` on the dataclass `obj`; errors name `where` (the YAML file), or the command line for keys in
    `given` (dotted names set by overrides)."""
    hints = _hints(type(obj))
    names = {f.name: f for f in fields(obj)}
    outer = where
    for key, value in values.items():
        full = f"{prefix}{key}"
        where = "command line" if full in given or any(g.startswith(full + ".") for g in given) else outer
        if key not in names and where != "command line" and key in getattr(type(obj), "RETIRED", ()):
            continue  # a key older kiln wrote into run folders' configs: the file still loads
        if key not in names:
            raise KilnError(f"{where}: unknown key {full!r}{did_you_mean(key, names)}"
                            .replace("did you mean '", f"did you mean '{prefix}"))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise KilnError(f"{where}: {full} expects a mapping of keys, got {value!r}")
            update_dataclass(getattr(obj, key), value, f"{full}.", outer, given)
            continue
        meta = names[key].metadata
        if meta.get("several") and isinstance(value, list):  # YAML: trackers: [mlflow, wandb]
            value = ",".join(str(v) for v in value)
        value = _coerce(full, value, tp, where)
        choices = meta.get("choices")
        if choices and meta.get("several"):  # a comma list, each item one of the choices
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            for item in items or [""]:
                if item not in choices:
                    raise KilnError(f"{where}: {full} must be a comma list of {', '.join(choices)}; got "
                                    f"{item!r}{did_you_mean(item, choices)}")
            value = ",".join(items)
        elif choices and value not in choices:
            raise KilnError(f"{where}: {full} must be one of {', '.join(choices)}; got {value!r}"
                            f"{did_you_mean(str(value), choices)}")
        setattr(obj, key, value)


_BOUND = re.compile(r"^(>=|>)\s*(-?\d+(?:\.\d+)?)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*([\])])$")


def in_range(value: float, spec: str) -> bool:
    """Is `value` inside `spec`: "> 0", ">= 1", "[0, 1)", "(0, 1]", ... or "any" (a finite number)?"""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if spec == "any":
        return True
    if m := _BOUND.match(spec):
        bound = float(m.group(2))
        return value >= bound if m.group(1) == ">=" else value > bound
    m = _INTERVAL.match(spec)
    assert m, f"bad range spec {spec!r}"
    lo, hi = float(m.group(2)), float(m.group(3))
    return (lo <= value if m.group(1) == "[" else lo < value) and (value <= hi if m.group(4) == "]" else value < hi)


def range_text(spec: str) -> str:
    return "a finite number" if spec == "any" else f"in {spec}" if spec[0] in "[(" else spec


def check_ranges(cfg, where: str = "config", given: set[str] = frozenset()) -> None:
    """Every numeric key of a loaded config against its declared range (the field's metadata "range": a verb
    that reads a key differently overrides the field in its own config class): a one-line KilnError naming the
    key, the value and the range. A key in `given` (set on the command line) is named as the flag, the others
    after `where` (the YAML file)."""

    def walk(obj, prefix: str) -> None:
        hints = _hints(type(obj))
        for f in fields(obj):
            key, value = prefix + f.name, getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(value, key + ".")
                continue
            spec = f.metadata.get("range")
            if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not in_range(value, spec):
                source = f"--{key}" if key in given else f"{where}: {key}"
                raise KilnError(f"{source} must be {range_text(spec)}, got {value!r}")

    walk(cfg, "")


def _flat_keys(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in values.items():
        out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KilnError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict:
    """['--train.lr', '3e-4', '--model.n_layer=6'] -> {'train': {'lr': '3e-4'}, 'model': {'n_layer': '6'}}"""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise KilnError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise KilnError(f"override --{key} needs a value")
            value = args[i + 1]
            i += 1
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        i += 1
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(d: dict) -> dict:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}} (the Python API takes either spelling)."""
    out: dict = {}
    for key, value in d.items():
        value = _nest(value) if isinstance(value, dict) else value
        for part in reversed(str(key).split(".")):
            value = {part: value}
        out = _merge(out, value)
    return out


def load_config(path: str | Path | None, overrides: list[str] | dict | None, cls, base: dict | None = None):
    """Defaults <- YAML file <- overrides. Returns a validated config dataclass."""
    values = dict(base or {})
    where, given = "config", set()
    if path is not None:
        values = _merge(values, read_yaml(path))
        where = str(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else _nest(overrides)
        values = _merge(values, ov)
        given = _flat_keys(ov) if isinstance(overrides, list) else set()
    cfg = cls()
    preset_name = values.get("model_preset") if any(f.name == "model_preset" for f in fields(cls)) else None
    if preset_name:
        from kiln.model.config import preset

        cfg.model = preset(str(preset_name))
    update_dataclass(cfg, values, where=where, given=given)
    check_ranges(cfg, where, given)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_help(cls, prefix: str = "", instance=None) -> list[tuple[str, str, str]]:
    """(flag, default, help) for every key, taken from the dataclasses: the single source of --help."""
    rows = []
    hints = _hints(cls)
    instance = cls() if instance is None else instance
    for f in fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows += config_help(type(value), f"{prefix}{f.name}.", value)
            continue
        rows.append((f"--{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows
