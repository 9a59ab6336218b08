"""``log.csv``: one row per training step (``step, lr, <each loss>, total, seconds``).

Rows are appended as each step completes, floats written with ``repr`` so they round-trip
exactly and two runs' logs can be compared bit for bit. A resumed run cuts the log back to its
checkpoint's step, so no step appears twice.

With evaluation during training (``TrainConfig.eval_every``) the log has one more column per
metric (``segm_AP``, ``segm_AP50``, ...), empty except in the rows of the steps at which the
model was evaluated; without it the columns are exactly the ones above.
"""

from __future__ import annotations

import csv
import io
import os

from .run_folder import atomic_save, atomic_write_text

LOG_NAME = "log.csv"

# Columns of log.csv around the model's own loss names (which may not reuse them).
LOG_COLUMNS_BEFORE = ("step", "lr")
LOG_COLUMNS_AFTER = ("total", "seconds")


class CsvLog:
    """``log.csv``: one row per step, appended (open, write, close) as each step completes.

    Opened at step ``keep_through``, it drops rows of later steps -- steps a crashed run logged
    after its last checkpoint, which the resumed run will compute again -- so no step appears
    twice. A fresh run (``keep_through=0``) therefore starts an empty log.

    ``metrics`` names extra columns after ``seconds`` (evaluation results), left empty by
    :meth:`append` and filled in by :meth:`fill`. A log written without them gains them (empty
    in the old rows) when a resumed run adds them.
    """

    def __init__(self, path: str, keep_through: int, metrics: tuple[str, ...] = ()):
        self.path = path
        self.metrics = tuple(metrics)
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
        self._write([self.columns, *kept] if self.columns is not None else [])

    def append(self, step: int, lr: float, losses: dict, total: float, seconds: float) -> None:
        columns = [*LOG_COLUMNS_BEFORE, *losses, *LOG_COLUMNS_AFTER, *self.metrics]
        new_file = self.columns is None
        if not new_file and columns != self.columns:
            self._change_metric_columns(columns, step, losses)
        # repr() of a float round-trips exactly, so the log can be compared bit for bit.
        row = [str(step), repr(float(lr)), *(repr(v) for v in losses.values()), repr(total)]
        row.append(f"{seconds:.4f}")
        row.extend("" for _ in self.metrics)
        with open(self.path, "w" if new_file else "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(columns)
            writer.writerow(row)
        self.columns = columns

    def fill(self, step: int, values: dict[str, float]) -> None:
        """Write ``{metric: value}`` into the row of ``step`` (rewriting the log atomically)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else []
        unknown = [k for k in values if k not in header]
        matching = [r for r in rows[1:] if r and r[0] == str(step)]
        if unknown or not matching:
            raise ValueError(f"{self.path!r} has no row for step {step} or no column {unknown}")
        row = matching[-1]
        for name, value in values.items():
            row[header.index(name)] = repr(float(value))
        self._write(rows)

    def _change_metric_columns(self, columns: list[str], step: int, losses: dict) -> None:
        """Rewrite the log with ``columns`` when only the metric columns after ``seconds``
        differ (evaluation switched on or off on resume); otherwise raise."""
        old = self.columns or []
        core = len(columns) - len(self.metrics)
        if "seconds" not in old or old[: old.index("seconds") + 1] != columns[:core]:
            raise ValueError(
                f"the model returned losses {list(losses)} at step {step}, but {self.path!r} "
                f"has columns {old}; a model must return the same loss names every "
                "step (0.0 for an absent term)"
            )
        with open(self.path, newline="") as f:
            rows = [dict(zip(old, r)) for r in list(csv.reader(f))[1:] if r]
        self._write([columns, *([r.get(c, "") for c in columns] for r in rows)])
        self.columns = columns

    def _write(self, rows: list[list[str]]) -> None:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        atomic_write_text(self.path, text.getvalue())


def draw_curves(log_path: str, plot_path: str, draw, say) -> str | None:
    """``draw(log_path, tmp)`` (``plot_training_curves``) into a temporary file renamed to
    ``plot_path``; returns ``plot_path``, or None without log rows or matplotlib. Any other
    failure is passed to ``say`` and returns None: a figure never stops training."""
    if not has_rows(log_path):
        return None
    try:
        return atomic_save(plot_path, lambda tmp: draw(log_path, tmp))
    except ImportError:
        return None
    except Exception as err:
        say(f"(loss curve not drawn: {type(err).__name__}: {err})")
        return None


def has_rows(path: str) -> bool:
    """True when the CSV at ``path`` has a header and at least one row."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return sum(1 for line, _ in zip(f, range(2)) if line.strip()) == 2
