"""What the CLI prints in a terminal: tables of results."""

from __future__ import annotations

import pyarrow as pa


def format_table(table: pa.Table, columns: list[str] | None = None) -> str:
    """A plain-text table for the terminal, floats to 4 significant digits."""
    columns = [c for c in (columns or table.column_names) if c in table.column_names]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    rows = [[cell(v) for v in row.values()] for row in table.select(columns).to_pylist()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), *(line(r) for r in rows)])
