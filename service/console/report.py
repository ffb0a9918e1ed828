"""A job's report.json as page sections: charts for what has a shape, tables for lists, the rest as is.

Known parts (size, parameters, latency, fidelity, accuracy, module tables, training curves, trials)
get charts; any other key is kept and rendered generically, so a report that grows new sections
(pipeline steps, new methods) still shows everything it says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from service.console import charts

# Report keys drawn by a dedicated section; everything else falls through to the generic view.
_DRAWN = {
    "method",
    "size",
    "parameters",
    "latency",
    "fidelity",
    "accuracy",
    "details",
    "trials",
    "steps",
    "warnings",
    "pareto_front",
    "chosen",
}
_TABLES = {
    # details key -> (caption, columns (key, heading))
    "quantized_modules": (
        "Quantized modules",
        [("module", "module"), ("type", "type"), ("tensors", "tensors"), ("kernel", "kernel")],
    ),
    "kept_float": (
        "Kept in float, and why",
        [("module", "module"), ("type", "type"), ("tensors", "tensors"), ("reason", "reason")],
    ),
    "groups": (
        "Channel groups pruned",
        [
            ("group", "group"),
            ("channels_before", "channels before"),
            ("channels_after", "channels after"),
            ("tensors", "tensors"),
        ],
    ),
    "left_whole": (
        "Left whole, and why",
        [("group", "group"), ("module", "module"), ("type", "type"), ("channels", "channels"), ("reason", "reason")],
    ),
    "layers": ("Sparsity per layer", [("parameter", "parameter"), ("elements", "elements"), ("sparsity", "sparsity")]),
}
_X_KEYS = ("bytes", "size_bytes", "bytes_after", "size", "size_ratio", "latency_ms", "latency", "latency_ratio", "macs")
_Y_KEYS = ("metric", "score", "value", "accuracy", "top1_agreement", "agreement", "cosine", "cosine_similarity")
_UNITS = {
    "bytes": "bytes",
    "size_bytes": "bytes",
    "bytes_after": "bytes",
    "size": "bytes",
    "latency_ms": "ms",
    "latency": "ms",
    "size_ratio": "ratio to original",
    "latency_ratio": "ratio to original",
    "macs": "MACs",
}


def sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ordered sections, each ``{"id", "title", "charts", "tables", "notes", "extra"}``."""
    out: list[dict[str, Any]] = []
    out.append(_measurements(report))
    details = report.get("details")
    if isinstance(details, Mapping):
        out.extend(_details(details))
    if isinstance(report.get("trials"), list) and report["trials"]:
        out.append(_trials(report))
    steps = report.get("steps")
    if isinstance(steps, list):
        for number, step in enumerate(steps, start=1):
            if isinstance(step, Mapping):
                for section in sections(step):
                    section["title"] = f"Step {number} ({step.get('method', '?')}): {section['title']}"
                    section["id"] = f"step{number}-{section['id']}"
                    out.append(section)
    extra = {key: value for key, value in report.items() if key not in _DRAWN}
    if extra:
        out.append(_section("more", "More in the report", extra=extra))
    return [
        section for section in out if section["charts"] or section["tables"] or section["notes"] or section["extra"]
    ]


def runtime_charts(report: Mapping[str, Any], artifacts: list[Mapping[str, Any]]) -> list[Markup]:
    """The compressed model on each runtime side by side: latency per batch (the original and the
    result on torch, then each artifact timed on its own runtime with the same statistic and batch),
    file size, and cosine to the original's outputs. Artifacts timed on another batch (a fixed-batch
    program) are left out of the latency chart and say so."""
    latency = report.get("latency") or {}
    size = report.get("size") or {}
    fidelity = report.get("fidelity") or {}
    measured = report.get("targets") or {}
    made = [a for a in artifacts if a.get("status") == "succeeded"]
    torch_runtime = str(latency.get("runtime") or "torch")
    drawn: list[Markup] = []
    times = [
        (f"original ({torch_runtime})", latency.get("before_ms")),
        (f"result ({torch_runtime})", latency.get("after_ms")),
    ]
    times += [
        (f"{a['name']} ({str(a.get('runtime') or '').split(' ')[0]})", a.get("latency_ms"))
        for a in made
        if a.get("latency_ratio") is not None
    ]
    other_batch = [a["name"] for a in made if a.get("latency_ms") is not None and a.get("latency_ratio") is None]
    if all(isinstance(v, (int, float)) for _, v in times) and len(times) > 2:
        drawn.append(
            charts.bars(
                "runtime-latency",
                f"Latency per batch by runtime, {latency.get('statistic', 'median')}",
                "ms",
                [(name, float(v)) for name, v in times],
                hatch_first=True,
                summary=f"batch {_plain(latency.get('batch_shape'))}, {_plain(latency.get('threads'))} threads"
                + (f"; not drawn, timed on their fixed batch: {', '.join(other_batch)}" if other_batch else ""),
            )
        )
    sizes = [("original", size.get("bytes_before")), ("result", size.get("bytes_after"))]
    sizes += [(a["name"], a.get("bytes")) for a in made]
    if all(isinstance(v, (int, float)) for _, v in sizes) and len(sizes) > 2:
        drawn.append(
            charts.bars(
                "runtime-bytes",
                "File size by runtime",
                "bytes",
                [(name, float(v)) for name, v in sizes],
                hatch_first=True,
            )
        )
    cosines = [("result", fidelity.get("cosine_similarity"))]
    cosines += [
        (a["name"], ((measured.get(a["name"]) or {}).get("fidelity") or {}).get("cosine_similarity")) for a in made
    ]
    if all(isinstance(v, (int, float)) for _, v in cosines) and len(cosines) > 1:
        drawn.append(
            charts.bars(
                "runtime-cosine",
                "Cosine to the original's outputs by runtime",
                "score, 0 to 1",
                [(name, float(v)) for name, v in cosines],
                scale_max=1.0,
            )
        )
    return drawn


def warnings_of(*sources: Mapping[str, Any] | None) -> list[str]:
    """Warnings from the job resource and the report, each once, in order."""
    seen: list[str] = []
    for source in sources:
        for warning in (source or {}).get("warnings") or []:
            text = (
                warning
                if isinstance(warning, str)
                else str(warning.get("detail") or warning.get("message") or warning)
                if isinstance(warning, Mapping)
                else str(warning)
            )
            if text not in seen:
                seen.append(text)
    return seen


# ---------------------------------------------------------------------------- sections


def _section(
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


def _measurements(report: Mapping[str, Any]) -> dict[str, Any]:
    drawn: list[Markup] = []
    size = report.get("size") or {}
    if _numbers(size, "bytes_before", "bytes_after"):
        drawn.append(
            charts.before_after_bars("size", "Model file size", "bytes", size["bytes_before"], size["bytes_after"])
        )
    if _numbers(size, "deflate_bytes_before", "deflate_bytes_after"):
        drawn.append(
            charts.before_after_bars(
                "deflate",
                "Size after deflate (download with gzip)",
                "bytes",
                size["deflate_bytes_before"],
                size["deflate_bytes_after"],
            )
        )
    parameters = report.get("parameters") or {}
    if _numbers(parameters, "before", "after"):
        drawn.append(
            charts.before_after_bars(
                "parameters",
                "Parameters (stored tensor elements)",
                "elements",
                parameters["before"],
                parameters["after"],
            )
        )
    latency = report.get("latency") or {}
    if _numbers(latency, "before_ms", "after_ms"):
        how = ", ".join(
            f"{key.replace('_', ' ')} {_plain(latency[key])}"
            for key in ("threads", "batch_shape")
            if latency.get(key) is not None
        )
        title = f"Latency per batch, {latency.get('statistic', 'median')} of {_plain(latency.get('runs'))} runs"
        drawn.append(
            charts.before_after_bars("latency", title, "ms", latency["before_ms"], latency["after_ms"], summary=how)
        )
    fidelity = report.get("fidelity") or {}
    scores = [
        (name.replace("_", " "), float(fidelity[name]))
        for name in ("cosine_similarity", "top1_agreement")
        if isinstance(fidelity.get(name), (int, float))
    ]
    if scores:
        drawn.append(
            charts.bars(
                "fidelity",
                f"Fidelity to the original, {_plain(fidelity.get('samples'))} samples",
                "score, 0 to 1",
                scores,
                scale_max=1.0,
                summary=f"inputs: {fidelity.get('inputs')}",
            )
        )
    accuracy = report.get("accuracy") or {}
    if _numbers(accuracy, "before", "after"):
        drawn.append(
            charts.before_after_bars(
                "accuracy",
                f"Accuracy on {accuracy.get('on', 'the data')}",
                "fraction correct",
                accuracy["before"],
                accuracy["after"],
            )
        )
    table_rows = [[key.replace("_", " "), _plain(value)] for key, value in fidelity.items()]
    tables = [{"caption": "Fidelity", "columns": ["measure", "value"], "rows": table_rows}] if table_rows else []
    return _section("measurements", "Before and after", drawn, tables)


def _details(details: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    tables = []
    for key, (caption, columns) in _TABLES.items():
        for where, rows in _find_lists(details, key):
            if rows and all(isinstance(row, Mapping) for row in rows):
                used = [(k, h) for k, h in columns if any(k in row for row in rows)]
                tables.append(
                    {
                        "caption": caption + (f" ({where})" if where else ""),
                        "columns": [h for _, h in used],
                        "rows": [[_plain(row.get(k)) for k, _ in used] for row in rows],
                        "key": key,
                    }
                )
    drawn: list[Markup] = []
    layers = details.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(r, Mapping) and "sparsity" in r for r in layers):
        drawn.append(
            charts.bars(
                "sparsity",
                "Share of weights set to zero, per layer",
                "fraction zero",
                [(str(r.get("parameter", "?")), float(r["sparsity"])) for r in layers],
                scale_max=1.0,
            )
        )
    macs = details.get("macs")
    if isinstance(macs, Mapping) and _numbers(macs, "before", "after"):
        drawn.append(
            charts.before_after_bars("macs", "Multiply-accumulates per batch", "MACs", macs["before"], macs["after"])
        )
    notes = [str(note) for note in details.get("notes") or []]
    curves = _curves(details)
    shown = {path for path, _ in curves} | {"layers", "macs", "notes"}
    shown |= {f"{where}.{key}".strip(".") for key in _TABLES for where, _ in _find_lists(details, key)}
    out.append(
        _section("modules", "What changed, module by module", drawn, tables, notes, extra=_rest(details, shown) or None)
    )
    for where, rows in curves:
        out.append(_curve_section(where, rows))
    return out


def _rest(node: Mapping[str, Any], shown: set[str], where: str = "") -> dict[str, Any]:
    """What the charts and tables did not show (temperature, best epoch, counts, a new method's keys)."""
    rest = {}
    for key, value in node.items():
        path = f"{where}.{key}".strip(".")
        if path in shown:
            continue
        if isinstance(value, Mapping):
            inner = _rest(value, shown, path)
            if inner:
                rest[key] = inner
        else:
            rest[key] = value
    return rest


def _curve_section(where: str, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-epoch rows: losses on one chart, 0..1 scores (agreement, accuracy) on another."""
    keys = [
        k for k in rows[0] if k != "epoch" and all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
    ]
    losses = {k: [(r["epoch"], r[k]) for r in rows if r.get(k) is not None] for k in keys if "loss" in k}
    scores = {k: [(r["epoch"], r[k]) for r in rows if r.get(k) is not None] for k in keys if "loss" not in k}
    name = "fine-tuning" if where.endswith("finetune") else "distillation" if where.endswith("epochs") else where
    if name == "distillation" and where != "epochs":  # one step of a schedule
        name += f" ({where.removesuffix('.epochs')})"
    drawn = []
    if any(losses.values()):
        drawn.append(
            charts.line_chart(
                f"curve-{where}-loss",
                f"Training loss per epoch ({name})",
                "epoch",
                "loss",
                {k.replace("_", " "): v for k, v in losses.items() if v},
            )
        )
    if any(scores.values()):
        fractions = all(0 <= y <= 1 for values in scores.values() for _, y in values)
        drawn.append(
            charts.line_chart(
                f"curve-{where}-scores",
                f"Validation scores per epoch ({name})",
                "epoch",
                "fraction, 0 to 1" if fractions else "score",
                {k.replace("_", " "): v for k, v in scores.items() if v},
                y_range=(0.0, 1.0) if fractions else None,
            )
        )
    return _section(f"curve-{where}", f"Training curve: {name}", drawn)


def _trials(report: Mapping[str, Any]) -> dict[str, Any]:
    trials = [t for t in report["trials"] if isinstance(t, Mapping)]
    x_key = next((k for k in _X_KEYS if any(isinstance(t.get(k), (int, float)) for t in trials)), None)
    y_key = next((k for k in _Y_KEYS if any(isinstance(t.get(k), (int, float)) for t in trials)), None)
    rows = [
        [
            _plain(t.get("id", t.get("trial", i + 1))),
            _plain(_trial_method(t)),
            _plain(t.get(x_key)),
            _plain(t.get(y_key)),
            "yes" if _on_front(report, t, i) else "",
            "yes" if _is_chosen(report, t, i) else "",
        ]
        for i, t in enumerate(trials)
    ]
    table = {
        "caption": "Trials",
        "columns": ["trial", "method", x_key or "size", y_key or "metric", "Pareto front", "chosen"],
        "rows": rows,
    }
    drawn = []
    if x_key and y_key:
        points = [
            {
                "x": float(t[x_key]),
                "y": float(t[y_key]),
                "label": f"trial {t.get('id', t.get('trial', i + 1))}"
                + (f" ({_trial_method(t)})" if _trial_method(t) else ""),
                "front": _on_front(report, t, i),
                "chosen": _is_chosen(report, t, i),
                "index": i,
            }
            for i, t in enumerate(trials)
            if isinstance(t.get(x_key), (int, float)) and isinstance(t.get(y_key), (int, float))
        ]
        if not any(p["front"] for p in points):
            _mark_front(points)
        metric = (report.get("target") or {}).get("metric") if isinstance(report.get("target"), Mapping) else None
        drawn.append(
            charts.scatter_front(
                "trials",
                "Search trials: size against metric",
                f"{x_key.replace('_', ' ')} ({_UNITS.get(x_key, 'value')})",
                metric or y_key.replace("_", " "),
                points,
            )
        )
    return _section("trials", "Search", drawn, [table])


# ---------------------------------------------------------------------------- helpers


def _numbers(mapping: Mapping[str, Any], *keys: str) -> bool:
    return all(isinstance(mapping.get(k), (int, float)) and not isinstance(mapping.get(k), bool) for k in keys)


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return charts.format_number(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return str(value)


def _find_lists(node: Any, key: str, where: str = "") -> list[tuple[str, list]]:
    """Every list under ``key`` anywhere in ``node`` (e.g. a width student's groups), with its path."""
    found = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            if k == key and isinstance(v, list):
                found.append((where, v))
            elif isinstance(v, Mapping):
                found.extend(_find_lists(v, key, f"{where}.{k}".strip(".")))
    return found


def _curves(node: Any, where: str = "") -> list[tuple[str, list[Mapping[str, Any]]]]:
    """Lists of per-epoch rows (dicts with a numeric 'epoch') anywhere under ``node``, also in the entries
    of other lists (a distillation schedule's steps: ``schedule.steps.1.epochs``, numbered from 1)."""
    found = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}".strip(".")
            if (
                isinstance(value, list)
                and value
                and all(isinstance(r, Mapping) and isinstance(r.get("epoch"), (int, float)) for r in value)
            ):
                found.append((path, value))
            elif isinstance(value, Mapping):
                found.extend(_curves(value, path))
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    found.extend(_curves(item, f"{path}.{index + 1}"))
    return found


def _trial_method(trial: Mapping[str, Any]) -> str:
    spec = trial.get("spec")
    if isinstance(spec, Mapping):
        if spec.get("method") == "pipeline" and isinstance(spec.get("steps"), list):
            return " + ".join(str(step.get("method")) for step in spec["steps"] if isinstance(step, Mapping))
        return str(spec.get("method", ""))
    return str(trial.get("method", ""))


def _refers(reference: Any, trial: Mapping[str, Any], index: int) -> bool:
    if isinstance(reference, Mapping):
        reference = reference.get("id", reference.get("trial", reference.get("index")))
    if reference is None:
        return False
    named = [trial[k] for k in ("id", "trial") if trial.get(k) is not None]
    return reference in named if named else reference == index  # by name when trials have one, else by position


def _on_front(report: Mapping[str, Any], trial: Mapping[str, Any], index: int) -> bool:
    if any(trial.get(k) for k in ("pareto", "front", "on_front", "pareto_front")):
        return True
    front = report.get("pareto_front")
    return isinstance(front, list) and any(_refers(ref, trial, index) for ref in front)


def _is_chosen(report: Mapping[str, Any], trial: Mapping[str, Any], index: int) -> bool:
    if any(trial.get(k) is True for k in ("chosen", "selected", "best")):
        return True
    return _refers(report.get("chosen", report.get("best_trial")), trial, index)


def _mark_front(points: list[dict[str, Any]]) -> None:
    """No front in the report: mark the points no other point beats (smaller x and larger y)."""
    for point in points:
        point["front"] = not any(
            o is not point
            and o["x"] <= point["x"]
            and o["y"] >= point["y"]
            and (o["x"] < point["x"] or o["y"] > point["y"])
            for o in points
        )
