"""Result tables: rows appended to ``<folder>/<name>.jsonl``, mirrored as CSV and JSON after each row."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

COLUMNS = ("time", "variant", "clip_t", "clip_i", "kid", "kid_std", "notes")


def add_row(folder: Path, name: str, row: dict) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **row}
    with (folder / f"{name}.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(ln) for ln in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    _atomic(folder / f"{name}.json", json.dumps(rows, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _atomic(folder / f"{name}.csv", buf.getvalue())
    return rows


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS[1:] if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
