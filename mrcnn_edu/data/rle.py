"""Compressed RLE strings (COCO's ``{"size": [h, w], "counts": "..."}``), checked without
painting the mask.

A binary mask is read column by column (Fortran order) as runs of equal pixels, starting with
a run of zeros (possibly empty); ``counts`` are the run lengths, which sum to ``h * w``.
pycocotools compresses the list into a string: each count ``c[i]`` is first replaced by its
difference with ``c[i - 2]`` when ``i > 2``; each (signed) number is then written 5 bits at a
time, least significant first, as characters ``chr(48 + d)`` for ``d`` in 0..63, where bit
``0x20`` of ``d`` says "more characters follow" and, on the last character, bit ``0x10`` is the
sign (the number is then ``value - 2 ** (5 * n_chars)``).

pycocotools' ``mask.decode`` checks almost none of this: a string whose runs overshoot
``h * w`` raises "Invalid RLE mask representation" (at training time, steps after the data
loaded), while a truncated string, a character outside ``'0'..'o'`` or runs that fall short of
``h * w`` decode *without an error* into a mask whose missing pixels are whatever was in
memory. ``compressed_rle_problems`` reads every string of a file at once with vectorised NumPy
(a few array passes over the characters, in chunks) and reports what is wrong with each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# pycocotools keeps counts as 32-bit unsigned ints; their differences fit in 7 characters
# (35 bits, signed). A longer number is corrupt (and could overflow int64 below).
MAX_CHARS_PER_NUMBER = 7
_CHUNK_CHARS = 1 << 20  # characters parsed per batch: bounds the temporary arrays (~60 MB)


def compressed_rle_counts(counts: str) -> np.ndarray:
    """The run lengths (int64) encoded by one compressed RLE string; ``ValueError`` naming the
    problem if the string is not a valid pycocotools encoding (its sum is not checked here)."""
    reasons, runs = _parse_chunk([counts])
    if reasons[0] is not None:
        shown = f"{counts[:24]!r}{'...' * (len(counts) > 24)}"
        raise ValueError(f"compressed RLE counts {shown}: {reasons[0]}")
    return runs[0]


def compressed_rle_problems(strings: Sequence[str], areas: Sequence[int]) -> list[str | None]:
    """For each compressed RLE string, ``None`` if it decodes to runs covering exactly
    ``areas[i]`` (= height * width) pixels, else a short reason.

    Checked: every character is in ``'0'..'o'``; the string does not stop in the middle of a
    number; no number is longer than ``MAX_CHARS_PER_NUMBER`` characters; no run length is
    negative; the runs sum to ``areas[i]``.
    """
    if len(strings) != len(areas):
        raise ValueError(f"got {len(strings)} RLE strings but {len(areas)} areas")
    reasons: list[str | None] = []
    start = 0
    while start < len(strings):
        stop, chars = start, 0
        while stop < len(strings) and (stop == start or chars < _CHUNK_CHARS):
            chars += len(strings[stop])
            stop += 1
        chunk_reasons, runs = _parse_chunk(strings[start:stop])
        for reason, r, area in zip(chunk_reasons, runs, areas[start:stop]):
            if reason is None:
                total = int(r.sum())
                if total != area:
                    reason = f"its runs cover {total} pixels, not height * width = {area}"
            reasons.append(reason)
        start = stop
    return reasons


def _parse_chunk(strings: Sequence[str]) -> tuple[list[str | None], list[np.ndarray]]:
    """(reason or None, run lengths) per string; the run lengths of a bad string are junk."""
    n = len(strings)
    reasons: list[str | None] = [
        None if isinstance(s, str) and s.isascii() else "it has non-ASCII characters"
        for s in strings
    ]
    raw = [s.encode("ascii") if r is None else b"" for s, r in zip(strings, reasons)]
    lengths = np.fromiter((len(b) for b in raw), np.int64, count=n)
    digits = np.frombuffer(b"".join(raw), np.uint8).astype(np.int64) - 48
    owner = np.repeat(np.arange(n), lengths)

    bad = np.flatnonzero((digits < 0) | (digits > 63))
    for pos in bad[::-1]:  # reversed: the first bad character of a string is reported
        reasons[owner[pos]] = f"character {chr(digits[pos] + 48)!r} is not in '0'..'o'"
    ends = np.cumsum(lengths)[lengths > 0] - 1
    last = (digits & 0x20) == 0
    for s in owner[ends[~last[ends]]]:
        reasons[s] = reasons[s] or "it stops in the middle of a number (truncated?)"
    last[ends] = True  # a number never runs on into the next string

    values, value_owner, too_long = _numbers(digits, last, owner)
    for s in np.unique(value_owner[too_long]):
        reasons[s] = reasons[s] or f"a number is longer than {MAX_CHARS_PER_NUMBER} characters"
    runs = _undo_differences(values, value_owner, n)
    split = np.cumsum(np.bincount(value_owner, minlength=n))[:-1]
    per_string = np.split(runs, split)
    for s in np.unique(value_owner[runs < 0]):
        reasons[s] = reasons[s] or "a run length is negative"
    return reasons, per_string


def _numbers(digits, last, owner):
    """Assemble the 5-bit groups into signed numbers: (values, owning string, too long?)."""
    if digits.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, bool)
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    stops = np.flatnonzero(last)
    n_chars = stops - starts + 1
    position = np.arange(digits.size) - np.repeat(starts, n_chars)
    position = np.minimum(position, MAX_CHARS_PER_NUMBER)  # junk past it, flagged as too long
    values = np.add.reduceat((digits & 0x1F) << (5 * position), starts)
    negative = (digits[stops] & 0x10) != 0
    width = 5 * np.minimum(n_chars, MAX_CHARS_PER_NUMBER + 1)
    values = np.where(negative, values - (np.int64(1) << width), values)
    return values, owner[starts], n_chars > MAX_CHARS_PER_NUMBER


def _undo_differences(values, value_owner, n):
    """counts[i] = values[i] + counts[i - 2] for i > 2, within each string.

    So counts 0, 1 and 2 are as written, odd counts are running sums from index 1 and even
    ones from index 2: one cumulative sum per (string, chain), done as a single sorted cumsum.
    """
    if values.size == 0:
        return values
    first = np.searchsorted(value_owner, np.arange(n))
    index = np.arange(values.size) - first[value_owner]
    chain = np.where(index == 0, 0, 1 + index % 2)
    order = np.argsort(value_owner * 3 + chain, kind="stable")
    key = (value_owner * 3 + chain)[order]
    total = np.cumsum(values[order])
    group_start = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    sizes = np.diff(np.append(group_start, key.size))
    before = np.repeat(total[group_start] - values[order][group_start], sizes)
    runs = np.empty_like(values)
    runs[order] = total - before
    return runs
