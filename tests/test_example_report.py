"""The committed example (docs/examples/cpu/: one run of the `cpu` preset on real CIFAR-10): every record
parses with the current schema (its metrics with its stage's), and its report shows what its records hold."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import pytest

from bench.record import Record
import bench.stages  # noqa: F401  (registers every stage)
from bench.stages.base import get_stage

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "cpu"


@pytest.fixture(scope="module")
def records() -> list[Record]:
    out = []
    for path in sorted((EXAMPLE / "records").glob("*.json")):
        record = Record.from_json(path.read_text(), origin=str(path))
        record.typed_metrics(get_stage(record.kind).Metrics)
        assert record.key == path.stem
        out.append(record)
    return out


def test_every_record_parses_with_the_current_schema(records):
    assert Counter(r.kind for r in records) == {"pretrain": 4, "pseudo_labels": 1, "finetune": 8, "evaluate": 8}
    assert {r.method for r in records if r.kind == "evaluate"} == {"simclr", "supervised_at", "acl", "advcl"}
    assert all(r.source == "cifar10" and r.data for r in records)
    keys = {r.key for r in records}
    assert all(set(r.inputs.values()) <= keys for r in records)  # every input is committed beside it


def test_the_report_shows_the_records_numbers(records):
    rows = list(csv.DictReader(io.StringIO((EXAMPLE / "report.csv").read_text())))
    md = (EXAMPLE / "report.md").read_text()
    for record in (r for r in records if r.kind == "evaluate"):
        for metric in ("sa", "ra", "aa"):
            value = 100 * record.metrics[metric]["value"]
            (row,) = [row for row in rows if (row["method"], row["finetuner"], row["metric"], row["axis"])
                      == (record.method, record.finetuner, metric, "")]
            assert float(row["value_pct"]) == pytest.approx(value, abs=1e-3)
            assert int(row["n"]) == record.metrics[metric]["n"]
            assert f"{value:.2f}" in md


def test_the_readme_says_how_it_was_made(records):
    text = (EXAMPLE / "README.md").read_text()
    assert "bench run --preset cpu" in text and "bench report" in text
    (commit,) = {r.provenance["git_sha"] for r in records}
    assert commit[:7] in text
    assert re.search(r"wall time[^\n]*\d+ min", text)
