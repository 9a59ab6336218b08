"""``log.csv``: one row per training step (``step, lr, <each loss>, total, seconds``).

Rows are appended as each step completes, floats written with ``repr`` so they round-trip
exactly and two runs' logs can be compared bit for bit. A resumed run cuts the log back to its
checkpoint's step, so no step appears twice.
"""

from __future__ import annotations

import csv
import os
import secrets

LOG_NAME = "log.csv"

# Columns of log.csv around the model's own loss names (which may not reuse them).
LOG_COLUMNS_BEFORE = ("step", "lr")
LOG_COLUMNS_AFTER = ("total", "seconds")


class CsvLog:
    """``log.csv``: one row per step, appended (open, write, close) as each step completes.

    Opened at step ``keep_through``, it drops rows of later steps -- steps a crashed run logged
    after its last checkpoint, which the resumed run will compute again -- so no step appears
    twice. A fresh run (``keep_through=0``) therefore starts an empty log.
    """

    def __init__(self, path: str, keep_through: int):
        self.path = path
        self.columns: list[str] | None = None
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept: list[list[str]] = []
        if rows and keep_through > 0:
            header = rows[0]
            if header[:2] != list(LOG_COLUMNS_BEFORE):
                raise ValueError(
                    f"{path!r} is not a training log (header {header}); use another out_dir"
                )
            try:
                kept = [r for r in rows[1:] if r and int(r[0]) <= keep_through]
            except ValueError as err:
                raise ValueError(f"{path!r} has a malformed row ({err}); remove it") from err
            self.columns = header
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", newline="") as f:
            if self.columns is not None:
                csv.writer(f).writerows([self.columns, *kept])
        os.replace(tmp, path)

    def append(self, step: int, lr: float, losses: dict, total: float, seconds: float) -> None:
        columns = [*LOG_COLUMNS_BEFORE, *losses, *LOG_COLUMNS_AFTER]
        new_file = self.columns is None
        if not new_file and columns != self.columns:
            raise ValueError(
                f"the model returned losses {list(losses)} at step {step}, but {self.path!r} "
                f"has columns {self.columns}; a model must return the same loss names every "
                "step (0.0 for an absent term)"
            )
        # repr() of a float round-trips exactly, so the log can be compared bit for bit.
        row = [str(step), repr(float(lr)), *(repr(v) for v in losses.values()), repr(total)]
        row.append(f"{seconds:.4f}")
        with open(self.path, "w" if new_file else "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(columns)
            writer.writerow(row)
        self.columns = columns


def has_rows(path: str) -> bool:
    """True when the CSV at ``path`` has a header and at least one row."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return sum(1 for line, _ in zip(f, range(2)) if line.strip()) == 2
