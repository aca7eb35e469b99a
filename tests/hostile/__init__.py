"""A battery of hostile inputs and faults: ``python -m tests.hostile`` runs every case and
prints a pass count. Each group module exposes ``CASES``: a list of :class:`Case`."""

from . import api, dataloss, files, users

GROUPS = (dataloss, files, api, users)
