"""Redis key rendering: a key template filled from each event's fields, for a whole batch at once."""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any, cast

from streamserve.pipeline.fields import millis_timestamp, text_getter, to_text
from streamserve.records import Event

RenderKey = Callable[[dict[str, Any]], str]
RenderKeys = Callable[[list[dict[str, Any]]], list[str | None]]


class KeyRenderer:
    """The Redis key of each event of a batch for one key template (None where a key field is null: no entity)."""

    def __init__(self, template: str, event_schema: Any | None = None) -> None:
        self.template = template
        self._render_one = _key_renderer(template, event_schema)
        self._render_all = _column_renderer(template, event_schema)

    def keys(self, events: Sequence[Event], everything: list[dict[str, Any]]) -> list[str | None]:
        """The events' keys (``everything``: their fields), all at once when every event fills the template."""
        try:
            return self._render_all(everything)
        except (KeyError, ValueError, IndexError, TypeError):
            pass  # find the events that cannot fill the template
        column: list[str | None] = []
        for event in events:
            try:
                column.append(self._render_one(event.fields))
            except (KeyError, ValueError, IndexError, TypeError):
                column.append(None)
        return column


def distinct(keys: list[str | None]) -> list[str]:
    """The keys once each, in order of first appearance, without None (no entity)."""
    found = dict.fromkeys(keys)
    found.pop(None, None)
    return cast("list[str]", list(found))


def _simple_template(template: str) -> tuple[str, str, str] | None:
    """(field, prefix, suffix) of a ``prefix{field}suffix`` template (one plain field, no format spec), else None."""
    parts = list(string.Formatter().parse(template))
    names = [name for _, name, _, _ in parts if name is not None]
    simple = all(not spec and conversion is None for _, name, spec, conversion in parts if name is not None)
    if not (simple and len(names) == 1 and names[0].isidentifier()):
        return None
    return names[0], parts[0][0], "".join(literal for literal, *_ in parts[1:])


def _column_renderer(template: str, event_schema: Any | None = None) -> RenderKeys:
    """_key_renderer for all the events of a batch at once: their keys, or the error of the first event that cannot
    fill the template (KeyError...: the caller then goes event by event). A ``prefix{field}suffix`` template over
    a text field reads the field as a column and formats it in one comprehension."""
    render = _key_renderer(template, event_schema)
    simple = _simple_template(template)
    if simple is None or millis_timestamp(event_schema, simple[0]):
        return lambda everything: list(map(render, everything))
    name, prefix, suffix = simple

    def render_all(everything: list[dict[str, Any]]) -> list[str | None]:
        values = [fields[name] for fields in everything]
        keys: list[str | None]
        if set(map(type, values)) <= {str}:
            keys = [f"{prefix}{value}{suffix}" for value in values]
        else:
            keys = list(map(render, everything))  # numbers as text; a null raises KeyError
        return keys

    return render_all


def _key_renderer(template: str, event_schema: Any | None = None) -> RenderKey:
    """Fills a key template from event field paths; KeyError when a field is null or absent (no entity).

    ``prefix{field}suffix`` renders as one f-string; other shapes (several fields, dotted paths, format
    specs) go through ``str.format`` with each field's value read by its path. A timestamp-millis field
    renders as the datetime it stands for (see fields.text_getter).
    """
    simple = _simple_template(template)
    if simple is not None:
        return _simple_renderer(*simple, event_schema)
    parts = list(string.Formatter().parse(template))
    names = [name for _, name, _, _ in parts if name is not None]
    getters = {name: text_getter(name, event_schema) for name in dict.fromkeys(names) if name}
    order = list(getters)
    positional = ""
    for literal, field_name, spec, conversion in parts:
        positional += literal.replace("{", "{{").replace("}", "}}")
        if field_name is not None:
            positional += "{" + str(order.index(field_name)) + (f"!{conversion}" if conversion else "")
            positional += (f":{spec}" if spec else "") + "}"

    def render(fields: dict[str, Any]) -> str:
        values = []
        for name, get in getters.items():
            value = get(fields)
            if value is None:
                raise KeyError(name)
            values.append(value)
        return positional.format(*values)

    return render


def _simple_renderer(name: str, prefix: str, suffix: str, event_schema: Any | None) -> RenderKey:
    """``prefix{name}suffix`` as one f-string (a timestamp-millis field as the datetime it stands for)."""
    moment = text_getter(name, event_schema) if millis_timestamp(event_schema, name) else None

    def render_one(fields: dict[str, Any]) -> str:
        value = fields[name] if moment is None else moment(fields)
        if value is None:
            raise KeyError(name)
        return f"{prefix}{value if isinstance(value, str) else to_text(value)}{suffix}"

    return render_one
