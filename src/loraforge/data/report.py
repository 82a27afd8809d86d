"""What happened to the data: rows read, kept and dropped per dataset, the problems found, token statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_STORED_PROBLEMS = 200  # every problem is counted; the first ones are kept to show


@dataclass
class Problem:
    """One unusable row: where it is and which field is at fault."""

    dataset: str
    file: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.dataset}: {self.file}:row {self.row}: `{self.field}`: {self.message}"


@dataclass
class DatasetCount:
    """Rows of one dataset (one split) read, kept and dropped."""

    name: str
    split: str
    read: int = 0
    kept: int = 0
    dropped: int = 0
    by_field: dict[str, int] = field(default_factory=dict)

    @property
    def bad_ratio(self) -> float:
        return self.dropped / self.read if self.read else 0.0


@dataclass
class TokenStats:
    """Token lengths of one tokenized split (before truncation, and how many examples were truncated)."""

    examples: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0
    truncated: int = 0
    no_trained_tokens: int = 0  # dropped: nothing left to train on after truncation
    total_tokens: int = 0
    trained_tokens: int = 0
    packed_sequences: int | None = None
    packing_fill: float | None = None  # tokens / (sequences * cutoff_len)

    def lines(self, split: str, cutoff_len: int) -> list[str]:
        out = [f"{split}: {self.examples} examples, {self.total_tokens} tokens "
               f"({self.trained_tokens} trained, {100 * self.trained_tokens / max(self.total_tokens, 1):.1f}%)",
               f"  length before truncation: min {self.min}, mean {self.mean:.1f}, p50 {self.p50}, p95 {self.p95}, "
               f"max {self.max}",
               f"  truncated to cutoff_len={cutoff_len}: {self.truncated} "
               f"({100 * self.truncated / max(self.examples, 1):.1f}%)"]
        if self.no_trained_tokens:
            out.append(f"  dropped {self.no_trained_tokens} with no trained token left after truncation "
                       "(raise cutoff_len)")
        if self.packed_sequences is not None:
            out.append(f"  packed into {self.packed_sequences} sequences of <= {cutoff_len} tokens "
                       f"({100 * (self.packing_fill or 0):.1f}% full)")
        return out


@dataclass
class DataReport:
    """Counts, problems and statistics of one data build; ``lines()`` is what `loraforge data check` prints."""

    datasets: list[DatasetCount] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    notes: list[str] = field(default_factory=list)
    tokens: dict[str, TokenStats] = field(default_factory=dict)
    cache: str | None = None

    @property
    def kept(self) -> int:
        return sum(d.kept for d in self.datasets)

    @property
    def dropped(self) -> int:
        return sum(d.dropped for d in self.datasets)

    def add_problem(self, count: DatasetCount, problem: Problem) -> None:
        """Count a bad row against its dataset and keep it to show when it is among the first ones."""
        count.dropped += 1
        count.by_field[problem.field] = count.by_field.get(problem.field, 0) + 1
        self.problem_count += 1
        if len(self.problems) < MAX_STORED_PROBLEMS:
            self.problems.append(problem)

    def merge(self, other: "DataReport") -> None:
        """Fold another report (e.g. the eval datasets') into this one."""
        self.datasets += other.datasets
        self.problems += other.problems[: max(0, MAX_STORED_PROBLEMS - len(self.problems))]
        self.problem_count += other.problem_count
        self.notes += other.notes
        self.tokens.update(other.tokens)

    def problem_lines(self, limit: int = 5) -> list[str]:
        """The first ``limit`` problems, then a count of the rest grouped by field."""
        out = [f"  - {p}" for p in self.problems[:limit]]
        rest = self.problem_count - min(limit, len(self.problems))
        if rest > 0:
            fields = Counter()
            for d in self.datasets:
                fields.update(d.by_field)
            top = ", ".join(f"`{k}` x{v}" for k, v in fields.most_common(4))
            out.append(f"  ... and {rest} more (by field: {top})")
        return out

    def lines(self, *, cutoff_len: int | None = None, max_problems: int = 5) -> list[str]:
        """A human-readable summary: per-dataset counts, the first problems, notes and token statistics."""
        out = []
        for d in self.datasets:
            out.append(f"{d.name} [{d.split}]: {d.read} rows read, {d.kept} kept, {d.dropped} dropped"
                       + (f" ({100 * d.bad_ratio:.1f}% bad)" if d.dropped else ""))
        out.append(f"total: {self.kept} kept, {self.dropped} dropped")
        if self.problem_count:
            out.append(f"problems ({self.problem_count}):")
            out += self.problem_lines(max_problems)
        out += [f"note: {n}" for n in self.notes]
        for split, stats in self.tokens.items():
            out += stats.lines(split, cutoff_len or 0)
        if self.cache:
            out.append(f"cache: {self.cache}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (stored beside cached datasets)."""
        return {"datasets": [asdict(d) for d in self.datasets], "problems": [asdict(p) for p in self.problems],
                "problem_count": self.problem_count, "notes": list(self.notes),
                "tokens": {k: asdict(v) for k, v in self.tokens.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataReport":
        """Read back :meth:`to_dict`."""
        return cls(datasets=[DatasetCount(**d) for d in data.get("datasets", [])],
                   problems=[Problem(**p) for p in data.get("problems", [])],
                   problem_count=int(data.get("problem_count", 0)), notes=list(data.get("notes", [])),
                   tokens={k: TokenStats(**v) for k, v in data.get("tokens", {}).items()})
