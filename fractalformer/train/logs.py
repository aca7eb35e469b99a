"""What a run logs: metrics.csv (and TensorBoard scalars), and the per-level loss lines."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..io import atomic_write

BASE_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpc", "elapsed_s"]


def sub_name(level: int, index: int | str) -> str:
    """A sub-model (or level ensemble) in metrics.csv column names: ``2.3``, ``1.ens``."""
    return f"{level}.{'ens' if index == 'ensemble' else index}"


def parse_sub_name(name: str) -> tuple[int, int | str] | None:
    """``(level, index)`` of a :func:`sub_name` (index ``"ensemble"`` for ``L.ens``); None for
    any other text, so readers of metrics.csv skip columns they do not know."""
    head, dot, index = name.partition(".")
    number = re.compile("[0-9]+")
    if not (dot and number.fullmatch(head) and (index == "ens" or number.fullmatch(index))):
        return None
    return int(head), "ensemble" if index == "ens" else int(index)


FULL_TRAIN = f"train_{sub_name(0, 0)}"  # the full model's own training loss in a nested run


def metric_fields(cfg: RunConfig) -> list[str]:
    """metrics.csv columns: totals, then each sub-model's train and val loss when nested."""
    subs = cfg.model.sub_models()
    if len(subs) == 1:
        return BASE_FIELDS
    ens = [sub_name(lv, "ensemble") for lv in range(cfg.model.nesting.levels)
           if cfg.model.sub_model_count(lv) > 1]
    return (BASE_FIELDS + [f"train_{sub_name(*k)}" for k in subs]
            + [f"val_{sub_name(*k)}" for k in subs] + [f"val_{e}" for e in ens])


def level_table(val: dict, widths: list[int]) -> list[str]:
    """Per-sub-model validation losses (nats/token), one compact line per level."""
    lines = []
    for lv, width in enumerate(widths):
        subs = [f"{v:.4f}" for k, v in val.items() if k[0] == lv and k[1] != "ensemble"]
        ens = val.get((lv, "ensemble"))
        tail = "" if ens is None else f" | ensemble {ens:.4f}"
        lines.append(f"  level {lv} (width {width}): " + " ".join(subs) + tail)
    return lines


class MetricsLog:
    """metrics.csv, and with ``log=tensorboard`` the same figures as TensorBoard scalars."""

    def __init__(self, path: Path, fields: list[str], tensorboard: Any = None) -> None:
        self._f = path.open("a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields)
        self._tb = tensorboard
        self._last: tuple[float, float] | None = None  # (tokens, elapsed) of the previous row

    def writerow(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()
        if self._tb is None:
            return
        step, tokens, elapsed = int(row["step"]), float(row["tokens"]), float(row["elapsed_s"])
        for key, value in row.items():
            if key.startswith(("train_", "val_")) and value != "":
                self._tb.add_scalar(key.replace("_", "/", 1), float(value), step)
        self._tb.add_scalar("lr", float(row["lr"]), step)
        if self._last is not None and elapsed > self._last[1]:
            self._tb.add_scalar("tokens_per_s", (tokens - self._last[0]) / (elapsed - self._last[1]), step)
        self._last = (tokens, elapsed)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *_: Any) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def tensorboard_writer(cfg: RunConfig, out: Path, start: int) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``RUN/tensorboard`` (None unless ``log=tensorboard``);
    a resumed run drops the events logged after its checkpoint (``purge_step``)."""
    if cfg.train.log != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=start or None)


def start_metrics(path: Path, fields: list[str], keep_until: int | None = None) -> None:
    """Write the header, keeping earlier rows up to step ``keep_until`` when resuming.

    Rows logged after the last checkpoint are dropped: the resumed run recomputes them.
    """
    rows: list[dict[str, str]] = []
    if keep_until is not None and path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                    and int(r["step"]) <= keep_until]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)
