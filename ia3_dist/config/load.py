"""Loading a run config: strict YAML, ``key.sub=value`` overrides, and construction of the typed sections.

:class:`RunConfigLoader` (a ``yaml.SafeLoader`` that refuses aliases, anchors, merge keys, duplicate keys and deep
nesting) gives a mapping (:class:`ConfigMapping`: a dict that knows each key's line); :func:`build_config`
constructs the dataclasses from it so that an unknown key, a wrong type or an impossible value fails with a
:class:`UsageError` naming the key, before anything starts, and :func:`load_config` adds where the key was set
(file line or override).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from .schema import ConfigKeyError, RunConfig, brief, fail, show

MAX_CONFIG_BYTES = 1 << 20
"""A run config is a few hundred bytes; anything near this is not one, and YAML parsing is slow per byte."""
MAX_DEPTH = 32
"""Nesting a run config may have (it needs 3); PyYAML composes nodes recursively and would hit RecursionError."""


_WHY_NO_ALIASES = "anchors and aliases are refused: nested aliases expand a small file into gigabytes"


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a run config must not use; the mark gives the file position."""


class ConfigMapping(dict):  # type: ignore[type-arg]
    """A mapping of a run config that knows where each of its keys was set, so that an error names the place.

    ``origin[key]``: the 1-based line of the key in the config file, or the override text (``train.lr=abc``) that
    set it. ``written[key]``: an unquoted scalar value as the file spells it (``0123``, which YAML reads as 83).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin: dict[Any, int | str] = {}
        self.written: dict[Any, str] = {}


class RunConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for run configs and override values.

    Refused, each naming line and column: aliases and anchors (a 500-byte "billion laughs" file of nested aliases
    expands to gigabytes), merge keys (only useful with aliases), duplicate keys (YAML silently keeps the last, so
    ``lr: 0.1`` then ``lr: 0.2`` trains with 0.2), nesting beyond :data:`MAX_DEPTH`, and scalars Python cannot
    represent (integers over 4300 digits, dates such as 2024-02-30).
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise RefusedYAML(None, None, f"YAML alias *{show(event.anchor)[1:-1]} is not allowed in a run config "
                              f"({_WHY_NO_ALIASES}); write the value out", event.start_mark)
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            raise RefusedYAML(None, None, f"YAML anchor &{show(event.anchor)[1:-1]} is not allowed in a run "
                              f"config ({_WHY_NO_ALIASES}); write each value out", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise RefusedYAML(None, None, f"nested more than {MAX_DEPTH} levels deep; a run config is sections of "
                              f"keys", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, LookupError, AttributeError, TypeError):
            # PyYAML's scalar constructors trust that the text matches the tag, as it does when the resolver chose
            # the tag; text given an explicit tag (`!!bool maybe`, `!!int ""`) fails with KeyError, IndexError or
            # AttributeError instead.
            what = node.tag.rpartition(":")[2] if isinstance(node.tag, str) else "value"
            text = node.value if isinstance(node, yaml.ScalarNode) else None
            implicit = text is not None and self.resolve(yaml.ScalarNode, text, (True, False)) == node.tag
            if implicit and what == "int":
                raise RefusedYAML(None, None, f"integer of {len(text)} characters is too large",
                                  node.start_mark) from None
            if implicit:
                raise RefusedYAML(None, None, f"cannot read {show(text)} as {what}; quote it to make it a string",
                                  node.start_mark) from None
            shown = show(text) if text is not None else "this value"
            raise RefusedYAML(None, None, f"cannot read {shown} as !!{what}; remove the tag (or give a value of that "
                              f"type)", node.start_mark) from None

    def construct_run_mapping(self, node: yaml.MappingNode) -> Any:
        data = ConfigMapping()
        yield data
        data.update(self.construct_mapping(node))
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)  # constructed above: the same object, from the cache
            data.origin[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
                data.written[key] = value_node.value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise RefusedYAML(None, None, "merge keys (<<) are not allowed in a run config; write the keys "
                                      "out", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:
                    continue  # unhashable: SafeConstructor reports it with its position
                if seen is not None:
                    # As written (`no`, not the boolean YAML 1.1 reads it as), so the user finds it in the file.
                    written = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                    raise RefusedYAML(None, None, f"duplicate key {show(written)} (first at line {seen.line + 1}); "
                                      f"YAML would silently keep the last one: keep one", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


RunConfigLoader.add_constructor("tag:yaml.org,2002:map", RunConfigLoader.construct_run_mapping)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RunConfigLoader)  # a SafeLoader subclass: no object construction


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NULLS = ("null", "Null", "NULL", "~")
"""How an override writes null (no value): YAML's spellings, not a bare comment such as ``#42``."""


def _yaml_reading(value: Any) -> str | None:
    """What YAML made of an unquoted scalar that is not text (``the number 83`` for ``0123``), or None."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {show(value)}"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return None


def _text(value: Any, key: str, written: str | None) -> str:
    reading = _yaml_reading(value)
    if reading is not None:
        # YAML 1.1 reads many unquoted words as other types (0123 is 83, 1.10 is 1.1, 12:30 is 750, 0x1F is 31, no
        # is false): turning them back into text would silently give another string than the one written.
        spelled = f"reads {written} as {reading}" if written is not None else f"read this value as {reading}"
        fix = f"quote it ({show(written)})" if written is not None else "quote it in the YAML"
        fail(key, f"expected a string, but YAML {spelled}; {fix} to keep it as written")
    if not isinstance(value, str):
        fail(key, f"expected a string, got {show(value)}")
    # Every string ends up in a path, a prompt or a command line, where NUL is an error or a truncation.
    if "\0" in value:
        fail(key, f"contains a NUL character: {show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone UTF-16 surrogate (YAML's "\ud800") is no character: writing it to a file or a tokenizer fails
        # later, in the middle of the run.
        fail(key, f"contains {show(value[e.start])[1:-1]} at character {e.start + 1}, half of a UTF-16 surrogate "
                  f"pair, which is not text; write the character itself (or its full \\U escape)")
    return value


def _field_type(parts: list[str]) -> Any:
    """The annotation of the config key ``parts`` (``["ia3", "target_modules"]``); None where it is no field."""
    tp: Any = RunConfig
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _unparsed_collection(text: str, parts: list[str], value: Any) -> None:
    """An override of a list or mapping setting (one that takes no text) whose value opens a YAML list or mapping
    it does not close (``ia3.target_modules=[query_key_value``, or brackets the shell took apart): YAML could not
    read it, so it came as text, and was taken as one name (``[query_key_value``). Refused, with YAML's reason."""
    if not isinstance(value, str) or not value.lstrip().startswith(("[", "{")):
        return
    tp = _field_type(parts)
    kinds = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    want = {typing.get_origin(k) or k for k in kinds}
    opens_list = value.lstrip()[0] == "["
    if str in want or not ((opens_list and list in want) or (not opens_list and dict in want)):
        return
    try:
        _load_yaml(value)
        return  # it parses: not the case here (the override's own value would not be text)
    except (yaml.YAMLError, RecursionError) as e:
        why = brief(str(getattr(e, "problem", None) or e).splitlines()[0])
    key = ".".join(parts)
    raise UsageError(f"override {brief(text)}: config key '{brief(key)}': {show(value)} opens a YAML "
                     f"{'list' if opens_list else 'mapping'} that does not parse ({why}); write it whole, in quotes "
                     f"(a bracket left open, or split by the shell): '{key}={'[a, b]' if opens_list else '{a: b}'}'")


def _coerce(value: Any, tp: Any, key: str, written: str | None = None) -> Any:
    """Check ``value`` against the annotation ``tp``; accept the few safe conversions YAML needs (int -> float,
    numeric strings such as ``3e-3`` that YAML 1.1 reads as strings). ``written``: the value as the file spells it,
    when it was an unquoted scalar (for the hint to quote it)."""
    if dataclasses.is_dataclass(tp):  # a list of sections: data.sources
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            item = typing.get_args(arg)
            if isinstance(value, list) and typing.get_origin(arg) is list and dataclasses.is_dataclass(item[0]):
                # A list of sections: its own message (data.sources[1].wieght: unknown key) says more than "expected
                # a list".
                return _coerce(value, arg, key)
        kinds = [a for a in args if a is not type(None)]
        if kinds == [bool] and type(None) in args:
            # Every optional switch leaves null to the run to decide (data.group_by_length, train.lean_host_memory):
            # "auto" says so, as it does for micro_batch_size and pack_length.
            if value == "auto":
                return None
            if not isinstance(value, bool):
                fail(key, f"expected true, false or auto (null), got {show(value)}")
        if len(kinds) == 1:  # Optional: the type's own message (data.columns.instruction: ...) says more
            return _coerce(value, kinds[0], key, written)
        for arg in kinds:
            try:
                return _coerce(value, arg, key, written)
            except UsageError:
                pass
        if str in args and int not in args and _yaml_reading(value) is not None:
            _text(value, key, written)  # a text setting: its message says how to keep the value as written
        fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {show(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            fail(key, f"expected a list, got {show(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            fail(key, f"expected a mapping, got {show(value)}")
        written_in = value.written if isinstance(value, ConfigMapping) else {}
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, val_tp, f"{key}.{k}", written_in.get(k))
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(key, f"expected true or false, got {show(value)}")
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        _plain_number(value, key, written)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail(key, f"expected an integer, got {show(value)}")
    if tp is float:
        # Range and finiteness are the schema's checks; here only "is it a number at all".
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                fail(key, f"number out of range, got {show(value)}")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, f"expected a number, got {show(value)}")
    if tp is str:
        return _text(value, key, written)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


_YAML11_NUMBER = re.compile(r"[-+]?0[0-9_]+|.*:.*")
"""Number spellings YAML 1.1 reads otherwise than they look: a leading zero is octal (0123 -> 83, 0512 -> 330),
colons are base 60 (1:30 -> 90)."""


def _plain_number(value: Any, key: str, written: str | None) -> None:
    if written is not None and _YAML11_NUMBER.fullmatch(written.strip()):
        fail(key, f"{written.strip()} is read by YAML 1.1 as {show(value)} (a leading zero is octal, colons are base "
                  f"60); write the number you mean without them (e.g. {show(value)} if that is it)")


def _override_value(value: Any, tp: Any, text: str) -> Any:
    """The value of an override for a setting that takes text: the text as typed where YAML reads something else
    (``run_name=2024-01-01`` a date, ``prompt_template={instruction}`` a mapping, ``run_name=#42`` a comment, so
    None); ``null`` and ``~`` stay None, and a list or integer stays one where the setting takes it."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    takes_list = any(typing.get_origin(a) is list and typing.get_args(a) == (str,) for a in args)
    if (str not in args and not takes_list) or isinstance(value, str):
        return value
    if value is None:
        return None if text.strip() in _NULLS else text
    if isinstance(value, list) and takes_list:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and int in args:
        return value
    return text


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(prefix, f"expected a mapping of keys, got {show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            name = k if isinstance(k, str) else show(k)
            fail(f"{prefix}.{name}" if prefix else name, f"unknown key; valid keys here: {', '.join(sorted(names))}")
    origin = raw.origin if isinstance(raw, ConfigMapping) else {}
    written = raw.written if isinstance(raw, ConfigMapping) else {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        value = raw[f.name]
        set_by = origin.get(f.name)
        if isinstance(set_by, str):  # an override's text
            value = _override_value(value, tp, set_by.partition("=")[2])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key)
        else:
            kwargs[f.name] = _coerce(value, tp, key, written.get(f.name))
    return cls(**kwargs)


def build_config(raw: Any) -> RunConfig:
    """Construct a :class:`RunConfig` from a plain mapping, failing loudly on anything unexpected."""
    return _build(RunConfig, raw, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001). The value is read as YAML so lists and nulls work; what the
    strict loader refuses (bad syntax, aliases, duplicate keys, a tag on a value it does not fit) is kept as the
    literal string. (Settings that take text get the text as typed where YAML reads something else: see
    :func:`apply_overrides`.)"""
    if "=" not in text:
        raise UsageError(f"override '{brief(text)}': expected key.sub=value (e.g. train.lr=1e-3)")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"override '{brief(text)}': empty key part")
    try:
        parsed = _load_yaml(value) if value.strip() else ""
    except (yaml.YAMLError, RecursionError):
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with the overrides applied, each key remembering the override that set it (errors name it; a setting
    that takes text gets the override's text as typed). ``raw`` itself when it is a :class:`ConfigMapping` (from
    :func:`read_yaml`), else a :class:`ConfigMapping` copy of it."""
    if not isinstance(raw, ConfigMapping):
        raw = ConfigMapping(raw)
    for text in overrides:
        parts, value = parse_override(text)
        _unparsed_collection(text, parts, value)
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = ConfigMapping()
                # A section this override made: an error under it is the override's, not the file's.
                node.origin[p] = text
                node.written.pop(p, None)
            if not isinstance(nxt, dict):
                raise UsageError(f"override '{brief(text)}': '{brief('.'.join(parts[: i + 1]))}' "
                                 f"is not a section")
            if not isinstance(nxt, ConfigMapping):
                nxt = node[p] = ConfigMapping(nxt)
            node = nxt
        node[parts[-1]] = value
        node.origin[parts[-1]] = text
        node.written.pop(parts[-1], None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node.written[parts[-1]] = text.partition("=")[2].strip()  # as typed: 0123 is octal to YAML 1.1
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a run config file; every way the file can be unusable is a :class:`UsageError` naming it."""
    p = Path(path)
    name = brief(str(p))
    try:
        if p.is_dir():
            raise UsageError(f"config file {name}: is a directory; give the path of a YAML file")
        if not p.exists():
            raise UsageError(f"config file {name}: not found")
        if not p.is_file():
            raise UsageError(f"config file {name}: not a regular file; give the path of a YAML file")
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        hint = "; check its permissions" if isinstance(e, PermissionError) else ""
        raise UsageError(f"config file {name}: cannot read it ({e.strerror or e}){hint}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {name}: larger than {MAX_CONFIG_BYTES} bytes; is it a run config?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = _load_yaml(text)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise UsageError(f"config file {name}:{line}: invalid YAML: character #x{e.character:04x} is not allowed; "
                         f"remove it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        what = "" if isinstance(e, RefusedYAML) else "invalid YAML: "
        raise UsageError(f"config file {where}: {what}{getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UsageError(f"config file {name}: nested too deeply; a run config is sections of keys") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"config file {name}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _set_at(raw: Any, key: str, whole: bool = False) -> int | str | None:
    """Where the config key ``key`` (``data.sources[1].weight``) was set: the text of the override that set it or a
    section above it, else the line of the deepest part of it the config file has, else None. ``whole``: None
    unless the config sets the key itself, not only a section above it."""
    where: int | str | None = None
    node = raw
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        if part.startswith("["):
            if not isinstance(node, list) or int(part[1:-1]) >= len(node):
                return None if whole else where
            node = node[int(part[1:-1])]
            continue
        if not isinstance(node, dict) or part not in node:
            return None if whole else where
        o = node.origin.get(part) if isinstance(node, ConfigMapping) else None
        # A line inside an override's own YAML (train={lr: x}) is not a line of the file.
        if isinstance(o, str) or (o is not None and not isinstance(where, str)):
            where = o
        node = node[part]
    return where


@contextmanager
def located(path: str | Path | None, overrides: list[str] | None = None) -> Iterator[None]:
    """A bad config key found after the config was built (the preflight's checks that need the model, the world
    or the data: ``train.global_batch_size`` on 3 ranks, ``train.compile`` with ZeRO-3) named with where it was
    set, as :func:`load_config` names its own: ``override train.compile=true: ...`` or ``c.yaml:12: ...``."""
    try:
        yield
    except ConfigKeyError as e:
        try:
            raw = apply_overrides(read_yaml(path) if path is not None else {}, list(overrides or []))
        except UsageError:
            raise e from None
        # Only where the key itself was set: a line of the section above it would point at what did not set it.
        where = _set_at(raw, e.key, whole=True)
        if isinstance(where, str):
            raise UsageError(f"override {brief(where)}: {e}") from None
        if path is not None and where is not None:
            raise UsageError(f"{brief(str(path))}:{where}: {e}") from None
        raise


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (or start from ``base``), apply overrides, construct and validate. A bad value is named with
    where it was set: ``override train.lr=abc: ...``, or ``c.yaml:12: ...``."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    if path is not None and not raw and not overrides:
        # Every key at its default is the embedded demo: a file that was never filled in (or lost its text) would
        # train that, in a job that queued for it, and call it done. (Overrides may set everything instead.)
        raise UsageError(f"config file {brief(str(path))}: holds no settings (empty, or only comments) and no "
                         f"overrides were given; give a run config (see configs/, e.g. configs/tiny-cpu.yaml)")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return build_config(raw)
    except ConfigKeyError as e:
        where = _set_at(raw, e.key)
        if isinstance(where, str):
            raise UsageError(f"override {brief(where)}: {e}") from None
        if path is not None:
            raise UsageError(f"{brief(str(path))}{'' if where is None else f':{where}'}: {e}") from None
        raise
    except UsageError as e:
        if path is not None:
            raise UsageError(f"{brief(str(path))}: {e}") from None
        raise
