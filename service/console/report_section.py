"""One section of the report page (``new_section``: its id, title, charts, tables, notes and the rest)
and how a report's values read in it (``plain_text``, ``has_numbers``); ``report`` and
``report_trials`` build their sections from these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from service.console import charts


def new_section(
    id_: str,
    title: str,
    charts_: list[Markup] | None = None,
    tables: list[dict] | None = None,
    notes: list[str] | None = None,
    extra: Any = None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "title": title,
        "charts": charts_ or [],
        "tables": tables or [],
        "notes": notes or [],
        "extra": extra,
    }


def has_numbers(mapping: Mapping[str, Any], *keys: str) -> bool:
    return all(isinstance(mapping.get(k), (int, float)) and not isinstance(mapping.get(k), bool) for k in keys)


def plain_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(plain_text(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return charts.format_number(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {plain_text(v)}" for k, v in value.items())
    return str(value)
