"""The ingest report: counts per dataset x split x task x class, alignment, notes and every rejected row, as
report.json (``IngestReport.to_dict``) and report.md (``markdown``). A sharded run's parts add up (``absorb``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator

from d2mtl.config.ingest import IngestConfig
from d2mtl.sources import Entry
from d2mtl.tasks import TASKS

REJECT_EXAMPLES_MD = 5  # per dataset x reason in report.md; report.json lists every rejected row


def age_bin(age: float) -> str:
    decade = min(int(age) // 10 * 10, 100)
    return "100+" if decade == 100 else f"{decade}-{decade + 9}"


def class_order(name: str) -> tuple[int, str]:
    """Sort key of a report class: age bins by their first year (``100+`` last), other classes by name."""
    first_year = name.split("-")[0].rstrip("+")
    return (int(first_year), "") if first_year.isdigit() else (-1, name)


def label_classes(labels: dict) -> Iterator[tuple[str, str]]:
    """(task, class name) pairs of one sample's labels, for the counts."""
    for task, value in labels.items():
        if task in ("age_low", "age_high"):
            continue
        spec = TASKS[task]
        yield task, (age_bin(value) if spec.kind == "regression" else spec.classes[int(value)])
    if "age_low" in labels:
        yield "age_group", f"{labels['age_low']:g}-{labels['age_high']:g}"


class IngestReport:
    """Counts per dataset x split x task x class, alignment, notes, and every rejected row."""

    def __init__(self) -> None:
        self.listed: Counter[str] = Counter()  # of the whole plan, in every part
        self.limited_out: Counter[str] = Counter()  # of the whole plan, in every part
        self.inputs: Counter[str] = Counter()  # of this part of the plan
        self.written: Counter[str] = Counter()
        self.alignment: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.notes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rejected: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.reject_rows: list[dict] = []
        self.classes: defaultdict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)  # (ds, split, task)
        self.splits: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def reject(self, dataset: str, sid: str, entry: Entry, reason: str, detail: str) -> None:
        self.rejected[dataset][reason] += 1
        self.reject_rows.append(
            {"dataset": dataset, "sample_id": sid, "source_uri": entry.source_uri, "reason": reason, "detail": detail}
        )

    def face(self, dataset: str, split: str, entry: Entry, alignment: str) -> None:
        self.written[dataset] += 1
        self.splits[dataset][split] += 1
        self.alignment[dataset][alignment] += 1
        for note in entry.notes:
            self.notes[dataset][note] += 1
        for task, name in label_classes(entry.labels):
            self.classes[dataset, split, task][name] += 1

    def absorb(self, part: dict) -> None:
        """Add the counts of a part's report.json; the listing counts are the whole plan's in every part."""
        for dataset, ds in part["datasets"].items():
            self.listed[dataset], self.limited_out[dataset] = ds["listed"], ds["limited_out"]
            self.inputs[dataset] += ds["inputs"]
            self.written[dataset] += ds["written"]
            self.rejected[dataset].update(ds["rejected_by_reason"])
            self.splits[dataset].update(ds["splits"])
            self.alignment[dataset].update(ds["alignment"])
            self.notes[dataset].update(ds["notes"])
            for split, tasks in ds["counts"].items():
                for task, classes in tasks.items():
                    self.classes[dataset, split, task].update(classes)
        self.reject_rows += part["rejects"]

    def check(self) -> None:
        for dataset in self.listed:
            rejected = sum(self.rejected[dataset].values())
            if self.inputs[dataset] != self.written[dataset] + rejected:
                raise AssertionError(
                    f"{dataset}: {self.inputs[dataset]} inputs != {self.written[dataset]} written + {rejected} rejected"
                )

    def to_dict(self, cfg: IngestConfig, elapsed_s: float, shard: dict) -> dict:
        """The report.json document; ``shard``: which part of which plan (index, count, plan digest)."""
        datasets = {}
        use = {spec.name: spec.use for spec in cfg.datasets}
        for dataset in self.listed:
            counts: dict = defaultdict(dict)
            for (ds, split, task), classes in sorted(self.classes.items()):
                if ds == dataset:
                    counts[split][task] = dict(sorted(classes.items(), key=lambda item: class_order(item[0])))
            datasets[dataset] = {
                "use": use.get(dataset, "train"),
                "listed": self.listed[dataset],
                "limited_out": self.limited_out[dataset],
                "inputs": self.inputs[dataset],
                "written": self.written[dataset],
                "rejected": sum(self.rejected[dataset].values()),
                "rejected_by_reason": dict(sorted(self.rejected[dataset].items())),
                "splits": dict(sorted(self.splits[dataset].items())),
                "alignment": dict(sorted(self.alignment[dataset].items())),
                "notes": dict(sorted(self.notes[dataset].items())),
                "counts": dict(counts),
            }
        written = sum(self.written.values())
        return {
            "inputs": sum(self.inputs.values()),
            "written": written,
            "rejected": len(self.reject_rows),
            "elapsed_s": round(elapsed_s, 1),
            "faces_per_s": round(written / elapsed_s, 1) if elapsed_s else None,
            "datasets": datasets,
            "rejects": sorted(self.reject_rows, key=lambda r: (r["dataset"], r["sample_id"])),
            "config": json.loads(cfg.model_dump_json()),
            "shard": shard,
        }


def markdown(report: dict) -> str:
    """report.md: the tables of report.json, with a few rejected rows per dataset x reason."""
    lines = [
        "# Ingest report",
        "",
        f"{report['inputs']} inputs = {report['written']} faces written + {report['rejected']} rejected, "
        f"in {report['elapsed_s']} s ({report['faces_per_s']} faces/s).",
        "",
    ]
    if "parts" in report:
        lines += [
            f"Merged from {len(report['parts'])} part(s) (time: the parts' sum + {report['merge_s']} s of merge; "
            "per part: " + ", ".join(f"{p['elapsed_s']} s" for p in report["parts"]) + ").",
            "",
        ]
    lines += [
        "| dataset | listed | limited out | inputs | written | rejected | aligned | trusted crop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ds in report["datasets"].items():
        lines.append(
            f"| {name} | {ds['listed']} | {ds['limited_out']} | {ds['inputs']} | {ds['written']} | "
            f"{ds['rejected']} | {ds['alignment'].get('aligned', 0)} | "
            f"{ds['alignment'].get('trusted_crop', 0)} |"
        )
    for name, ds in report["datasets"].items():
        lines += ["", f"## {name}", ""]
        if ds["use"] == "evaluate":
            lines.append("Evaluation only: its labels are never trained on; pseudo-labelling treats it as unlabelled.")
        lines.append("Splits: " + ", ".join(f"{k} {v}" for k, v in ds["splits"].items()))
        if ds["notes"]:
            lines.append("Kept with a missing label: " + ", ".join(f"{k} ({v})" for k, v in ds["notes"].items()))
        if ds["rejected_by_reason"]:
            lines += ["", "| rejected: reason | rows | examples |", "|---|---|---|"]
            for reason, count in ds["rejected_by_reason"].items():
                examples = [
                    r["source_uri"] for r in report["rejects"] if r["dataset"] == name and r["reason"] == reason
                ][:REJECT_EXAMPLES_MD]
                lines.append(f"| {reason} | {count} | {'<br>'.join(examples)} |")
        splits = list(ds["counts"])
        rows = sorted(
            {(task, cls) for split in splits for task, classes in ds["counts"][split].items() for cls in classes},
            key=lambda row: (row[0], class_order(row[1])),
        )
        if rows:
            lines += ["", "| task | class | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
            for task, cls in rows:
                cells = [str(ds["counts"][split].get(task, {}).get(cls, 0)) for split in splits]
                lines.append(f"| {task} | {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
