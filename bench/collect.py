"""Session-wide record of the cases that were skipped (and why), for the results file."""

from __future__ import annotations

from typing import Dict, List

SKIPPED: List[Dict[str, object]] = []


def reset() -> None:
    SKIPPED.clear()


def skipped(case, reason: str, label: str = "") -> None:
    row = case.to_json()
    row.update({"reason": reason, "label": label})
    SKIPPED.append(row)
