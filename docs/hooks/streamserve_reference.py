"""The configuration and CLI references, generated from the code so that they cannot drift from it.

``config_reference()`` walks the pydantic settings tree (``streamserve.config.PipelineSettings``): every key,
nested and dotted, with its type, default, environment variable and description (the field's description or
the docstring under it). ``cli_reference()`` walks the argparse parser of ``streamserve.cli.build_parser``:
every subcommand, however deep, with its ``--help``. The docs hook (``docs/hooks/streamserve_docs.py``) puts
them into ``docs/reference/`` at build time; ``tests/unit/test_docs_reference.py`` checks them.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HELP_WIDTH = 100
"""Columns of the rendered --help texts, so that the page does not depend on the terminal that built it."""


@dataclass(frozen=True)
class SettingsKey:
    """One key of the settings tree as the reference shows it."""

    path: str
    """Dotted key as written in the YAML file (``kafka.bootstrap_servers``, ``features[].name``)."""
    type: str
    default: str
    env: str | None
    """Environment variable that sets it; None inside a list (the whole list is set as JSON)."""
    description: str


# --- configuration -------------------------------------------------------------------------------------------


def settings_keys(model: type[BaseModel], env_prefix: str, delimiter: str) -> Iterator[SettingsKey]:
    """Every key of a settings model, depth first, nested sections and list items included."""
    yield from _walk(model, prefix="", env=env_prefix.rstrip("_") if env_prefix else "", delimiter=delimiter)


def _walk(model: type[BaseModel], prefix: str, env: str | None, delimiter: str) -> Iterator[SettingsKey]:
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}{key}"
        env_name = f"{env}{delimiter if prefix else '_'}{key.upper()}" if env is not None else None
        section = _model_of(field.annotation)
        item = _list_item_model(field.annotation)
        nested = section or item
        yield SettingsKey(
            path=path,
            type=type_name(field.annotation),
            default=default_text(field),
            env=env_name,
            description=_description(field, docs.get(name) or (nested.__doc__ if nested else None)),
        )
        if section is not None:
            yield from _walk(section, f"{path}.", env_name, delimiter)
        if item is not None:
            yield from _walk(item, f"{path}[].", None, delimiter)


def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The string literal under each annotated attribute of a class body (its field docstring)."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    statements = body.body
    for statement, following in itertools.pairwise(statements):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = following.value.value
    return docs


def _description(field: FieldInfo, docstring: str | None) -> str:
    text = field.description or docstring or ""
    text = " ".join(inspect.cleandoc(text).split())
    return text.replace("``", "`")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field (``BatchSettings``), also when optional."""
    candidates = [annotation, *typing.get_args(annotation)] if _is_union(annotation) else [annotation]
    for candidate in candidates:
        if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if inspect.isclass(item) and issubclass(item, BaseModel):
            return item
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """A type as a reader of YAML thinks of it: ``int``, ``str | null``, ``"wait" | "fail"``, ``list[str]``."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{arg}"' if isinstance(arg, str) else str(arg) for arg in args)
    if _is_union(annotation):
        return " | ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]"
    if origin is not None:  # an alias such as Annotated
        return type_name(args[0])
    if annotation is SecretStr:
        return "secret str"
    if annotation is Path:
        return "path"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section" if not annotation.__name__.endswith("Spec") else "mapping"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as YAML would spell it; ``required`` when there is none."""
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:  # a factory of the other fields' values (pydantic's default_factory(data))
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return _yaml_value(value)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def config_reference() -> str:
    """Markdown: one table per top-level section of the pipeline settings."""
    from streamserve.config import PipelineSettings

    config = PipelineSettings.model_config
    prefix = str(config.get("env_prefix", ""))
    delimiter = str(config.get("env_nested_delimiter", "__"))
    keys = list(settings_keys(PipelineSettings, prefix, delimiter))
    fields = PipelineSettings.model_fields
    nested = {
        field.alias or name: (field, name)
        for name, field in fields.items()
        if _model_of(field.annotation) or _list_item_model(field.annotation)
    }
    scalars = [key for key in keys if "." not in key.path and key.path not in nested]
    lines = ["## Top-level keys", "", *_table(scalars), ""]
    for key, (field, _name) in nested.items():
        lines += [f"## {key}", ""]
        if _list_item_model(field.annotation) is not None:
            env = f"{prefix}{key.upper()}"
            note = "A list; each item has the keys below. As an environment variable, the whole list as JSON"
            lines += [f"{note}: `{env}`.", ""]
        own = [k for k in keys if k.path == key or k.path.startswith((f"{key}.", f"{key}[]."))]
        lines += [*_table(own), ""]
    return "\n".join(lines)


def _table(keys: list[SettingsKey]) -> list[str]:
    rows = ["| key | type | default | environment variable | description |", "|---|---|---|---|---|"]
    for key in keys:
        env = f"`{key.env}`" if key.env else "(in the list)"
        cells = [f"`{key.path}`", _code(key.type), _code(key.default), env, _cell(key.description)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _code(text: str) -> str:
    return f"`{text}`"  # a | inside a code span does not split the cell (Python-Markdown's tables)


def _cell(text: str) -> str:
    """Pipes outside code spans escaped, so that they do not split the cell."""
    pieces = re.split(r"(`[^`]*`)", text)
    return "".join(piece if piece.startswith("`") else piece.replace("|", "\\|") for piece in pieces)


# --- CLI -----------------------------------------------------------------------------------------------------


def command_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """Every parser below ``parser`` (itself first) with its command words, in the order they were added."""
    yield [], parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) in seen:  # an alias of a command already listed
                    continue
                seen.add(id(child))
                for words, grandchild in command_parsers(child):
                    yield [name, *words], grandchild


def cli_reference() -> str:
    """Markdown: the --help of ``streamserve`` and of each of its subcommands, from the real parser."""
    from streamserve.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        parser = build_parser()
        sections: list[str] = []
        for words, command in command_parsers(parser):
            title = " ".join(["streamserve", *words])
            help_text = _stable(command.format_help())
            sections += [f"## {title}", "", "```text", help_text.rstrip(), "```", ""]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(sections)


def _stable(text: str) -> str:
    """The help as argparse wrote it, minus trailing spaces."""
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


if __name__ == "__main__":  # `python docs/hooks/streamserve_reference.py config|cli`: a reference without the site
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    choice = sys.argv[1] if len(sys.argv) > 1 else ""
    if choice not in ("config", "cli"):
        sys.exit("usage: python docs/hooks/streamserve_reference.py config|cli")
    try:
        print(config_reference() if choice == "config" else cli_reference())
    except BrokenPipeError:  # piped into head
        sys.stderr.close()
