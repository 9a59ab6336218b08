"""Progress bars: a tqdm bar when tqdm (an optional dependency) is installed, else None."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, **options):
    """``tqdm(total=total, desc=desc, unit=unit, **options)``, or None without tqdm (callers
    then print plain lines or nothing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, **options)
