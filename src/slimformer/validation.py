"""Turning pydantic and YAML problems into plain, bounded messages (used by every config).

``format_errors`` gives one ``path: message, got value`` line per problem, in words (a missing
tag lists the allowed ones; patterns are described), with echoed values shortened;
``safe_load_bounded`` is ``yaml.safe_load`` with bounds on alias expansion and nesting.
"""

from __future__ import annotations

import typing
from typing import Annotated

from pydantic import BaseModel, ValidationError

from slimformer.errors import ConfigError

MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
NAME_PATTERN = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
_PATTERN_WORDS = {NAME_PATTERN: "must be letters, digits, '_', '.' and '-' only, and not only dots"}


def _discriminated(root) -> dict[str, list[str]]:
    """Tag values of every discriminated union reachable from ``root``: {field: {tags}}."""
    found: dict[str, dict[str, None]] = {}  # insertion-ordered sets
    seen: dict[type, None] = {}
    stack = [root]
    while stack:
        ann = stack.pop(0)  # breadth first: tags in declaration order
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann in seen:
                continue
            seen[ann] = None
            for f in ann.model_fields.values():
                stack.append(f.annotation)
                disc = getattr(f, "discriminator", None)
                if isinstance(disc, str):
                    found.setdefault(disc, {})
                for meta in f.metadata:
                    if isinstance(getattr(meta, "discriminator", None), str):
                        found.setdefault(meta.discriminator, {})
            continue
        for a in typing.get_args(ann):
            if getattr(a, "discriminator", None) and isinstance(a.discriminator, str):
                found.setdefault(a.discriminator, {})
            stack.append(a)
    for cls in seen:
        for name in found:
            fld = cls.model_fields.get(name)
            if fld is not None:
                found[name] |= dict.fromkeys(v for v in typing.get_args(fld.annotation)
                                             if isinstance(v, str))
    return {k: list(v) for k, v in found.items()}


def _path(loc: tuple, root=None) -> str:
    tags = set().union(*_discriminated(root).values()) if root is not None else set()
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in tags or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _allowed(root: type[BaseModel], loc: tuple) -> list[str] | None:
    cls: object = root
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(cls)
            cls = args[0] if args else cls
        elif isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            cls = cls.model_fields[part].annotation
        else:
            cls = _pick_tag(cls, part)
        while typing.get_origin(cls) in (Annotated, list) or typing.get_origin(cls) is typing.Union:
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            if typing.get_origin(cls) is typing.Union or len(args) != 1:
                break
            cls = args[0]
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _pick_tag(cls, tag):
    """The member of the union ``cls`` whose tag (a one-value ``Literal`` field) is ``tag``."""
    for a in typing.get_args(cls) or ():
        for b in typing.get_args(a) or (a,):
            if isinstance(b, type) and issubclass(b, BaseModel):
                for fld in b.model_fields.values():
                    if typing.get_origin(fld.annotation) is typing.Literal and \
                            tag in typing.get_args(fld.annotation):
                        return b
    return cls


def format_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One ``path: message, got value`` line per pydantic error."""
    lines = []
    for err in exc.errors(include_url=False):
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed(root, loc[:-1]) if root else None
            tail = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{_path(loc, root)}: unknown key{tail}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "union_tag_not_found":  # pydantic's words for a missing tag field
            msg = _missing_tag(root, loc, err.get("ctx", {}))
        elif kind == "union_tag_invalid":
            msg = _bad_tag(err.get("ctx", {}))
        elif kind == "string_pattern_mismatch":
            msg = _PATTERN_WORDS.get(err.get("ctx", {}).get("pattern"), msg)
        got = err.get("input")
        show = kind not in ("missing", "union_tag_not_found", "union_tag_invalid") and \
            not isinstance(got, dict | list)
        lines.append(f"{_path(loc, root)}: {msg}" + (f", got {short_repr(got)}" if show else ""))
    return lines


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (errors never echo huge values)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 6, 6, 2
    text = r.repr(value)
    return text if len(text) <= limit + 10 else f"{text[:limit]}...({len(text)} chars)"


def _missing_tag(root, loc: tuple, ctx: dict) -> str:
    field = ctx.get("discriminator", "").strip("'") or "source"
    tags = ", ".join(_tags_of(root, loc, field))
    return f"{field} is missing; it must be one of: {tags}" if tags else f"{field} is missing"


def _bad_tag(ctx: dict) -> str:
    field = ctx.get("discriminator", "").strip("'")
    expected = ctx.get("expected_tags", "")
    return f"unknown {field} {ctx.get('tag')!r}; allowed: {expected}"


def _tags_of(root, loc: tuple, field: str) -> list[str]:
    """The allowed values of the tag ``field`` (all unions of ``root`` that use it)."""
    if root is None:
        return []
    return _discriminated(root).get(field, [])


def safe_load_bounded(raw: bytes | str, source: str = "YAML") -> object:
    """``yaml.safe_load`` that refuses huge alias expansion or nesting before building values.

    The YAML is composed into nodes first; expanding every alias is counted (at most
    :data:`MAX_YAML_NODES` nodes, :data:`MAX_YAML_DEPTH` levels) before any value is built.

    Raises:
        ConfigError: Not UTF-8, not YAML, or over the bounds.
    """
    import yaml

    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                               f"{exc.start}); save the file as UTF-8"], source) from None
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {short_repr(str(exc), 300)}"], source) from None
    except RecursionError:
        raise ConfigError([f"nesting deeper than {MAX_YAML_DEPTH} levels"], source) from None
    finally:
        loader.dispose()


def _check_size(root, source: str) -> None:
    import yaml

    count, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError([f"more than {MAX_YAML_NODES:,} values once aliases are expanded "
                               "(an alias bomb?); a real config is far smaller"], source)
        if depth > MAX_YAML_DEPTH:
            raise ConfigError([f"nested deeper than {MAX_YAML_DEPTH} levels"], source)
        if isinstance(node, yaml.SequenceNode):
            stack += [(n, depth + 1) for n in node.value]
        elif isinstance(node, yaml.MappingNode):
            stack += [(n, depth + 1) for kv in node.value for n in kv]
