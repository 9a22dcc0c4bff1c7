"""Command-line and YAML parsing derived from the config dataclasses.

llama-recipes (via `fire`) accepts `--field value`, bare `--flag`, `--flag True|False`
and qualified `--config_name.field value`; a bare name sets every config that has it
(so `--mixed_precision False` reaches both train_config and fsdp_config).
"""
from __future__ import annotations

import dataclasses
import difflib
import textwrap
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .schema import ALL_CONFIGS, Configs, default_configs, fsdp_config, help_text, train_config
from ..errors import UserError

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _targets(cfgs: Configs, name: str) -> list[tuple[Any, str]]:
    """(config instance, field name) pairs that a flag name refers to."""
    instances = cfgs.all()
    if "." in name:
        cls_name, fname = name.split(".", 1)
        return [(c, fname) for c in instances if type(c).__name__ == cls_name and fname in _hints(type(c))]
    return [(c, name) for c in instances if name in _hints(type(c))]


def _known_names() -> list[str]:
    names = set()
    for cls in ALL_CONFIGS:
        for f in fields(cls):
            names.add(f.name)
            names.add(f"{cls.__name__}.{f.name}")
    return sorted(names)


def _unknown(name: str) -> UserError:
    close = difflib.get_close_matches(name, _known_names(), n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else "; see the config reference in README.md"
    return UserError(f"unknown flag --{name}{hint}")


def convert(value: Any, tp, flag: str) -> Any:
    """Convert a CLI string or YAML value to the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip().strip("'\"") for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"--{flag} expects a comma-separated list, got {value!r}")
        return [str(v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise UserError(f"--{flag} expects True or False, got {value!r}")
    try:
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"--{flag} expects a value of type {tp.__name__}, got {value!r}") from None


def _set(cfgs: Configs, name: str, raw: Any) -> None:
    targets = _targets(cfgs, name)
    if not targets:
        raise _unknown(name)
    for cfg, fname in targets:
        tp = _hints(type(cfg))[fname]
        if fname == "quantization" and (raw is True or str(raw).lower() in _TRUE):
            value = "8bit"  # the seed's boolean --quantization meant 8-bit
        elif fname == "quantization" and (raw is False or str(raw).lower() in _FALSE):
            value = None
        else:
            value = convert(raw, tp, name)
        setattr(cfg, fname, value)
        cfgs.explicit.add(f"{type(cfg).__name__}.{fname}")


def _flag_takes_value(cfgs: Configs, name: str, nxt: str | None) -> bool:
    """Booleans (and --quantization) may be bare; everything else needs a value."""
    targets = _targets(cfgs, name)
    if not targets:
        raise _unknown(name)
    cfg, fname = targets[0]
    tp = _hints(type(cfg))[fname]
    optional_flag = tp is bool or fname == "quantization"
    if not optional_flag:
        return True
    if nxt is None or nxt.startswith("--"):
        return False
    low = nxt.lower()
    if tp is bool:
        return low in _TRUE | _FALSE
    return low in _TRUE | _FALSE | {"8bit", "4bit", "none"}


def load_yaml(cfgs: Configs, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path} ({err.strerror}); check its permissions") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    for key, value in data.items():
        if isinstance(value, dict):  # nested: {lora_config: {r: 16}}
            for sub, v in value.items():
                _set(cfgs, f"{key}.{sub}", v)
        else:
            _set(cfgs, str(key), value)


def usage() -> str:
    """Every flag, grouped by config, with its default and meaning (the fields' metadata)."""
    lines = ["usage: llama_finetuning.py [--field value | --flag] ... [--config FILE.yaml] [--debug]",
             "",
             "A bare name sets every config that has the field; a qualified one (--lora_config.r 16) only",
             "that config. --config FILE.yaml supplies values first (flat or nested); flags override it.",
             "--debug: an error also prints its traceback. The full reference is README.md's Flags section."]
    for cls in ALL_CONFIGS:
        lines.append(f"\n{cls.__name__}:")
        for f in fields(cls):
            lines.append(f"  --{_help_name(cls, f.name)} (default: {shown_default(f)})")
            lines += textwrap.wrap(help_text(cls, f), 96, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                break_on_hyphens=False)
    return "\n".join(lines)


def _help_name(cls, name: str) -> str:
    """train_config's and fsdp_config's own fields bare, as llama-recipes users type them; the
    rest qualified, since a bare name would set that field in every config that has it."""
    if cls is train_config or (cls is fsdp_config and sum(name in _hints(c) for c in ALL_CONFIGS) == 1):
        return name
    return f"{cls.__name__}.{name}"


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as a user types it: lists comma-separated, the empty string as \"\"."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, list):
        return ",".join(value)
    return '""' if value == "" else str(value)


def parse_args(argv: list[str]) -> Configs:
    cfgs = default_configs()
    tokens = list(argv)
    # --config first, so the CLI overrides it wherever it appears.
    for i, tok in enumerate(tokens):
        if tok == "--config" or tok.startswith("--config="):
            path = tok.split("=", 1)[1] if "=" in tok else (tokens[i + 1] if i + 1 < len(tokens) else None)
            if not path:
                raise UserError("--config needs a YAML file path")
            load_yaml(cfgs, path)
            del tokens[i : i + (1 if "=" in tok else 2)]
            break
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument {tok!r}; flags look like --name value")
        name = tok[2:]
        if "=" in name:
            name, raw = name.split("=", 1)
            _set(cfgs, name, raw)
            i += 1
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if _flag_takes_value(cfgs, name, nxt):
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                raise UserError(f"--{name} needs a value")
            _set(cfgs, name, nxt)
            i += 2
        else:
            _set(cfgs, name, True)
            i += 1
    return cfgs
