"""The report's tables and figures beyond the paper's layouts, in one place for `bench.report`:
other threat models (bench.report.threats) and common corruptions (bench.report.corruptions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.collect import Results


def extra_tables(results: Results) -> list[Any]:
    from bench.report.corruptions import corruption_tables
    from bench.report.threats import threat_tables

    return threat_tables(results) + corruption_tables(results)


def extra_csv_rows(results: Results) -> list[dict[str, Any]]:
    from bench.report.corruptions import corruption_csv_rows
    from bench.report.threats import threat_csv_rows

    return threat_csv_rows(results) + corruption_csv_rows(results)


def extra_figures(results: Results, folder: Path) -> list[Any]:
    from bench.report.corruptions import corruption_figures

    return corruption_figures(results, folder)
