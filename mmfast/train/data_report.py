"""Bad-row accounting: nothing is skipped without being counted, and the first offenders are kept so
the log says where to look. `strict` turns a skip into an error naming the file and the row."""

from __future__ import annotations

from dataclasses import dataclass


class BadRowError(ValueError):
    """A row that cannot be used, raised in strict mode (and by `DataReport.skip(strict=True)`)."""

    def __init__(self, source: str, row: int, reason: str, path: str | None = None):
        self.source, self.row, self.reason, self.path = source, row, reason, path
        super().__init__(f"{source}, row {row}: {reason}" + (f": {path}" if path else ""))

    def __reduce__(self):  # picklable across dataloader workers and processes
        return type(self), (self.source, self.row, self.reason, self.path)


class BadImageError(ValueError):
    """An image that is missing or cannot be decoded. `reason` is "missing image" or "corrupt image"
    (what `DataReport.skip` counts); `detail` says what the decoder said."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.detail)


@dataclass(frozen=True)
class BadRow:
    source: str
    row: int
    path: str | None = None


class DataReport:
    """Counts skipped rows by reason and keeps the first `keep` offenders of each; also counts the rows
    read per file. Plain data: picklable, and `to_dict`/`from_dict` round-trip through JSON or
    `all_gather_object`.

    `merge` adds another report's counts. Merge reports of disjoint work only (dataloader workers,
    ranks' own batches); every rank loading the same files has the same load-time report.
    """

    def __init__(self, strict: bool = False, keep: int = 5):
        self.strict, self.keep = bool(strict), keep
        self.counts: dict[str, int] = {}
        self.offenders: dict[str, list[BadRow]] = {}
        self.rows: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Rows skipped, over every reason."""
        return sum(self.counts.values())

    @property
    def rows_read(self) -> int:
        return sum(self.rows.values())

    def read(self, source: str, rows: int) -> None:
        """Records that `rows` data rows were read from `source` (skipped ones included)."""
        self.rows[source] = self.rows.get(source, 0) + rows

    def skip(self, source: str, row: int, reason: str, path: str | None = None, *, strict: bool | None = None) -> None:
        """Counts one skipped row; raises BadRowError instead when strict (this call's `strict`, or the
        report's when None)."""
        if self.strict if strict is None else strict:
            raise BadRowError(source, row, reason, path)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.offenders.setdefault(reason, [])
        if len(kept) < self.keep:
            kept.append(BadRow(source, row, path))

    def merge(self, other: DataReport | dict) -> None:
        other = DataReport.from_dict(other) if isinstance(other, dict) else other
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            kept = self.offenders.setdefault(reason, [])
            kept.extend(other.offenders.get(reason, [])[: max(0, self.keep - len(kept))])
        for source, n in other.rows.items():
            self.read(source, n)

    def summary(self) -> str:
        """Human-readable lines for the log: rows read, skips per reason with the first offenders."""
        files = f"{len(self.rows)} file{'s' * (len(self.rows) != 1)}"
        if not self.total:
            return f"data: {self.rows_read} rows read from {files}, none skipped"
        share = f" ({100 * self.total / self.rows_read:.2f}%)" if self.rows_read else ""
        lines = [f"data: {self.rows_read} rows read from {files}, {self.total} skipped{share}"]
        for reason in sorted(self.counts, key=lambda r: (-self.counts[r], r)):
            first = "; ".join(
                f"{b.source} row {b.row}" + (f" ({b.path})" if b.path else "") for b in self.offenders.get(reason, [])
            )
            lines.append(f"  {reason}: {self.counts[reason]}, first: {first}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "offenders": {r: [[b.source, b.row, b.path] for b in kept] for r, kept in self.offenders.items()},
            "rows": dict(self.rows),
            "strict": self.strict,
            "keep": self.keep,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DataReport:
        report = cls(strict=data.get("strict", False), keep=data.get("keep", 5))
        report.counts = {str(r): int(n) for r, n in data.get("counts", {}).items()}
        report.offenders = {
            r: [BadRow(s, int(i), p) for s, i, p in kept] for r, kept in data.get("offenders", {}).items()
        }
        report.rows = {str(s): int(n) for s, n in data.get("rows", {}).items()}
        return report

    def __eq__(self, other) -> bool:
        return isinstance(other, DataReport) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"DataReport(rows_read={self.rows_read}, skipped={self.counts})"
