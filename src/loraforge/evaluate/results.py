"""Files written by predict: the resumable predictions JSONL and the merged results JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    """Write ``{split}_results.json`` and merge ``metrics`` into ``all_results.json`` (other keys are kept)."""
    _atomic_write(out_dir / f"{split}_results.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    all_path = out_dir / "all_results.json"
    merged: dict[str, Any] = {}
    if all_path.is_file():
        try:
            merged = json.loads(all_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            merged = {}
        if not isinstance(merged, dict):
            merged = {}
    merged.update(metrics)
    _atomic_write(all_path, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")


class PredictionFile:
    """``generated_predictions.jsonl``: one JSON object per sample (index, prompt, predict, label), appended and
    flushed per batch so an interrupted run keeps its work; rows already there are reused on the next run.

    A row whose prompt differs from the current eval set's prompt at that index means the file belongs to
    another run: that is an error (not silently mixed), unless ``overwrite`` starts the file over.
    """

    def __init__(self, path: Path, prompts: Sequence[str], *, overwrite: bool = False):
        self.path = path
        self.prompts = list(prompts)
        self.done: dict[int, dict[str, Any]] = {}
        self._handle = None
        if overwrite and path.exists():
            path.unlink()
        if path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        dropped = 0
        for lineno, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # the line being written when the run was interrupted
                    dropped += 1
                    continue
                raise DataError(f"{self.path}:{lineno} is not valid JSON",
                                hint="delete the file or set `predict_overwrite: true` to start over") from None
            index = row.get("index") if isinstance(row, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(self.prompts) or \
                    row.get("prompt") != self.prompts[index] or "predict" not in row:
                raise DataError(
                    f"{self.path}:{lineno} does not match this eval set (index {index!r}): the file comes from "
                    "another run or dataset",
                    hint="use another output_dir, delete the file, or set `predict_overwrite: true`")
            self.done[index] = row
        if dropped:
            self._rewrite(sorted(self.done.values(), key=lambda r: r["index"]))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        _atomic_write(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and push them to disk before returning."""
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        for row in rows:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done[row["index"]] = row
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file (rows written so far stay)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finalize(self) -> list[dict[str, Any]]:
        """All rows in eval-set order; the file is rewritten in that order once every sample is there."""
        self.close()
        missing = [i for i in range(len(self.prompts)) if i not in self.done]
        if missing:
            raise DataError(f"{self.path} lacks {len(missing)} predictions (first index {missing[0]})",
                            hint="run predict again to resume")
        rows = [self.done[i] for i in range(len(self.prompts))]
        self._rewrite(rows)
        return rows
