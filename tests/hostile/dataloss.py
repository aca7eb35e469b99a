"""Hostile cases: dataloss."""

from __future__ import annotations

from .common import Case

CASES: list[Case] = []
