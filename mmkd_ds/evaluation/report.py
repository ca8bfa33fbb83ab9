"""One result type for every zero-shot transfer task: per-language scores and their averages.

Written as JSON (with the seeds and hyper-parameters that produced it), as a markdown table,
and as TensorBoard scalars, so a distillation run can be judged per language.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOW_RESOURCE = ("sw", "ur")


@dataclass
class TaskResult:
    """Scores of one model on one task.

    ``scores[lang][metric]`` in [0, 1] (e.g. accuracy; exact_match and f1 for QA);
    ``main_metric`` names the metric averaged over languages.
    """

    task: str
    model: str
    main_metric: str
    scores: dict[str, dict[str, float]]
    examples: dict[str, int]
    low_resource: tuple[str, ...] = LOW_RESOURCE
    settings: dict = field(default_factory=dict)  # seeds, hyper-parameters, data sources

    @property
    def average(self) -> float:
        values = [s[self.main_metric] for s in self.scores.values()]
        return sum(values) / len(values) if values else float("nan")

    @property
    def low_resource_average(self) -> float | None:
        values = [s[self.main_metric] for lang, s in self.scores.items() if lang in self.low_resource]
        return sum(values) / len(values) if values else None

    def to_json(self) -> str:
        data = asdict(self)
        data["average"] = self.average
        data["low_resource_average"] = self.low_resource_average
        return json.dumps(data, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        metrics = sorted({m for s in self.scores.values() for m in s}, key=lambda m: (m != self.main_metric, m))
        lines = [f"{self.task} — {self.model}", "", "| language | examples | " + " | ".join(metrics) + " |",
                 "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
        for lang in sorted(self.scores):
            cells = " | ".join(f"{100 * self.scores[lang][m]:.1f}" for m in metrics)
            lines.append(f"| {lang} | {self.examples.get(lang, 0)} | {cells} |")
        lines.append("")
        lines.append(f"average {self.main_metric}: {100 * self.average:.1f}")
        low = self.low_resource_average
        shown = f"{100 * low:.1f}" if low is not None else "n/a, none present"
        lines.append(f"low-resource average ({', '.join(self.low_resource)}): {shown}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> None:
        """``<task>.json`` and ``<task>.md`` in out_dir, plus TensorBoard scalars under tensorboard/."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.task}.json").write_text(self.to_json())
        (out / f"{self.task}.md").write_text(self.to_markdown())
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tensorboard")) as writer:
            for lang, metrics in self.scores.items():
                for name, value in metrics.items():
                    writer.add_scalar(f"{self.task}/{lang}/{name}", value, 0)
            writer.add_scalar(f"{self.task}/average_{self.main_metric}", self.average, 0)
            if self.low_resource_average is not None:
                writer.add_scalar(f"{self.task}/low_resource_average_{self.main_metric}", self.low_resource_average, 0)
