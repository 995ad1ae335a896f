"""A sweep's search space, written as `section.field=expression` on the command line or as a
`section.field: expression` YAML mapping, checked against the config before any trial starts.

    loguniform(a, b)  uniform(a, b)  randint(a, b)   (randint: a <= n < b, as Tune's)
    choice(v1, v2, ...)   grid(v1, v2, ...)   (grid: every value is run, as Tune's grid_search)

A value of choice/grid may be a tuple for a tuple field (`choice((32,64,64), (48,64,64))`); it is
carried as its override text ("32,64,64"), since Optuna samples only plain values. A sampled
trial becomes `--set`-style overrides (`overrides`), so a trial's config is built by the same
pipeline.config path as a run's.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import typing
from dataclasses import dataclass

from pipeline import config as config_module

RANGES = ("loguniform", "uniform", "randint")
SETS = ("choice", "grid")
_EXPRESSION = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Param:
    key: str  # section.field
    kind: str  # one of RANGES + SETS
    values: tuple  # (low, high) for a range; the candidates for choice/grid

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def upper(self) -> float:
        """The largest value a numeric parameter can take (randint's high is exclusive)."""
        return max(self.values) - (1 if self.kind == "randint" else 0)


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments (commas inside brackets belong to a tuple)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _literal(text: str):
    """A number, a tuple (as its override text), a boolean, or else the bare word as a string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip("'\"")
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return value


def parse(key: str, expression: str) -> Param:
    """One parameter; ValueError naming the key and expression when it is not understood."""
    match = _EXPRESSION.match(str(expression))
    where = f"search space {key}={expression}"
    if not match or match.group(1) not in RANGES + SETS:
        raise ValueError(f"{where}: expected one of {', '.join(f'{k}(...)' for k in RANGES + SETS)}")
    kind, values = match.group(1), tuple(_literal(a) for a in _split_args(match.group(2)))
    if kind in RANGES:
        if len(values) != 2 or not Param(key, kind, values).numeric:
            raise ValueError(f"{where}: {kind} takes two numbers, low and high")
        low, high = values
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ValueError(f"{where}: needs low < high" + (" and low > 0" if kind ==
                                                                "loguniform" else ""))
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ValueError(f"{where}: randint takes two integers")
    elif not values:
        raise ValueError(f"{where}: {kind} needs at least one value")
    return Param(key, kind, values)


def _check_field(param: Param, preset: str) -> None:
    """The key names a real config field and every value (or both bounds) applies to it."""
    cfg = config_module.PRESETS[preset]()
    *path, name = param.key.split(".")
    target = cfg
    for part in path:
        target = getattr(target, part, None)
    hints = typing.get_type_hints(type(target)) if dataclasses.is_dataclass(target) else {}
    if name not in hints or dataclasses.is_dataclass(getattr(target, name)):
        raise ValueError(f"search space key {param.key!r} is not a config field (section.field, "
                         f"as --set takes)")
    if param.kind in RANGES and hints[name] not in (int, float):
        raise ValueError(f"search space {param.key}: {param.kind} needs a numeric field, "
                         f"{param.key} is {hints[name]}")
    if param.kind == "randint" and hints[name] is not int:
        raise ValueError(f"search space {param.key}: randint needs an integer field")
    for value in param.values:
        try:
            config_module.apply_overrides(cfg, [config_module.override(param.key, value)])
        except ValueError as err:
            raise ValueError(f"search space {param.key}: {err}") from err


def from_items(items: list[str], preset: str = "demo") -> dict[str, Param]:
    """`section.field=expression` strings (the --space option)."""
    space = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"search space {item!r} must look like section.field=expression")
        key, expression = (s.strip() for s in item.split("=", 1))
        space[key] = parse(key, expression)
    return checked(space, preset)


def from_yaml(text: str, preset: str = "demo") -> dict[str, Param]:
    """A YAML mapping of `section.field: expression` (or nested `section: {field: ...}`)."""
    import yaml

    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise ValueError("a search space YAML must be a mapping of section.field: expression")
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            flat[str(key)] = value
    return checked({key: parse(key, str(value)) for key, value in flat.items()}, preset)


def checked(space: dict[str, Param], preset: str) -> dict[str, Param]:
    if not space:
        raise ValueError("the search space is empty: give --space section.field=expression")
    for param in space.values():
        _check_field(param, preset)
    return space


def overrides(params: dict) -> list[str]:
    """A trial's sampled values as `section.field=value` overrides."""
    return [config_module.override(key, value) for key, value in sorted(params.items())]


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(p.values) for p in space.values() if p.kind == "grid")
