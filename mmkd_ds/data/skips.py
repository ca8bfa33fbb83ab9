"""A tally of the input that was dropped or repaired while reading a corpus.

Bad lines never stop a run (a web-crawled corpus always has some), but they must not vanish
silently either: every dropped line is counted under a reason, and the first few of each
reason are kept with their ``path:line`` so that a user can open the file and look.
Repairs (a CRLF ending, a byte-order mark) are counted separately because the pair is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One kept example: (origin "path:line", reason, short detail).
Example = tuple[str, str, str]

# Details are for humans reading a summary; a whole 100 kB line would drown it.
_MAX_DETAIL = 80


def _short(detail: str) -> str:
    return detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."


@dataclass
class SkipLog:
    """Counts of skipped and repaired input per reason, with the first examples of each."""

    # How many examples to keep per reason (the rest are only counted).
    report_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Example]] = field(default_factory=dict)
    repair_examples: dict[str, list[Example]] = field(default_factory=dict)

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        """Record that the line or row at ``origin`` was dropped for ``reason``."""
        self._add(self.counts, self.examples, reason, origin, detail)

    def repair(self, reason: str, origin: str, detail: str = "") -> None:
        """Record that the line at ``origin`` was repaired for ``reason`` and kept."""
        self._add(self.repairs, self.repair_examples, reason, origin, detail)

    def _add(
        self,
        counts: dict[str, int],
        examples: dict[str, list[Example]],
        reason: str,
        origin: str,
        detail: str,
    ) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        kept = examples.setdefault(reason, [])
        if len(kept) < self.report_examples:
            kept.append((origin, reason, _short(detail)))

    def merge(self, other: SkipLog) -> None:
        """Add ``other``'s counts and examples to this log (examples up to this log's limit)."""
        for src_counts, src_ex, dst_counts, dst_ex in (
            (other.counts, other.examples, self.counts, self.examples),
            (other.repairs, other.repair_examples, self.repairs, self.repair_examples),
        ):
            for reason, n in src_counts.items():
                dst_counts[reason] = dst_counts.get(reason, 0) + n
            for reason, exs in src_ex.items():
                kept = dst_ex.setdefault(reason, [])
                kept.extend(exs[: max(0, self.report_examples - len(kept))])

    @property
    def total_skipped(self) -> int:
        """Lines or rows dropped, all reasons together."""
        return sum(self.counts.values())

    @property
    def total_repaired(self) -> int:
        """Lines repaired and kept, all reasons together."""
        return sum(self.repairs.values())

    def summary(self) -> str:
        """Several lines: the totals, then one line per reason with its count and examples."""
        if not self.counts and not self.repairs:
            return "nothing skipped or repaired"
        lines = [f"skipped {self.total_skipped}, repaired {self.total_repaired}"]
        for kind, counts, examples in (
            ("skipped", self.counts, self.examples),
            ("repaired", self.repairs, self.repair_examples),
        ):
            # Most frequent reason first: that is the one worth fixing at the source.
            for reason in sorted(counts, key=lambda r: (-counts[r], r)):
                shown = ", ".join(
                    f"{origin} ({detail})" if detail else origin
                    for origin, _, detail in examples.get(reason, [])
                )
                more = counts[reason] - len(examples.get(reason, []))
                if more > 0:
                    shown += f", and {more} more"
                where = f" at {shown}" if shown else ""
                lines.append(f"  {kind} {reason}: {counts[reason]}{where}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """``{"skipped": {reason: {"count": n, "examples": [{"at": "path:line", "detail": d}]}},
        "repaired": {...}}``: what ``skips.json`` holds."""
        return {
            kind: {
                reason: {"count": counts[reason],
                         "examples": [{"at": origin, "detail": detail} for origin, _, detail in examples.get(reason, [])]}
                for reason in sorted(counts, key=lambda r: (-counts[r], r))
            }
            for kind, counts, examples in (("skipped", self.counts, self.examples),
                                           ("repaired", self.repairs, self.repair_examples))
        }

    def short(self, kind: str = "skipped") -> str:
        """``"no_tab 3, crlf 2"``: the counts of one kind ("skipped" or "repaired") on one line."""
        counts = self.counts if kind == "skipped" else self.repairs
        return ", ".join(f"{r} {counts[r]}" for r in sorted(counts, key=lambda r: (-counts[r], r)))
