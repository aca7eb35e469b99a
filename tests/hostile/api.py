"""Hostile cases: api."""

from __future__ import annotations

from .common import Case

CASES: list[Case] = []
