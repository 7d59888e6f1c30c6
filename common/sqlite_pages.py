"""One page of a filtered listing from SQLite: rows oldest first after a cursor, and the next cursor.

The stores keep a row's order in an INTEGER `seq` column and the record itself as msgpack in `body`;
a listing is `seq > cursor`, the filters given, `ORDER BY seq`, one row more than the page to know
whether another page follows (its cursor is the page's last seq; 0: none).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")


class Filters:
    """The WHERE clauses of a listing, with their parameters; an empty filter value matches all."""

    def __init__(self, cursor: int):
        self.clauses: list[str] = ["seq > ?"]
        self.params: list[Any] = [cursor]

    def equal(self, column: str, value: Any) -> "Filters":
        if value:
            self.add(f"{column} = ?", value)
        return self

    def one_of(self, column: str, values: Iterable[Any]) -> "Filters":
        values = list(values)
        if values:
            self.add(f"{column} IN ({','.join('?' * len(values))})", *values)
        return self

    def add(self, clause: str, *params: Any) -> "Filters":
        self.clauses.append(clause)
        self.params.extend(params)
        return self


def page(
    db: sqlite3.Connection, table: str, filters: Filters, limit: int, decode: Callable[[bytes], T]
) -> tuple[list[T], int]:
    sql = f"SELECT seq, body FROM {table} WHERE {' AND '.join(filters.clauses)} ORDER BY seq LIMIT ?"
    rows = db.execute(sql, [*filters.params, limit + 1]).fetchall()
    kept = rows[:limit]
    next_cursor = kept[-1][0] if len(rows) > limit else 0
    return [decode(body) for _, body in kept], next_cursor
