"""The ACL family's published numbers (bench/report/published/acl_family.json) are well formed."""

import json
from pathlib import Path

import bench
from bench.config import resolve
from bench.registry import METHODS

PATH = Path(bench.__file__).resolve().parent / "report" / "published" / "acl_family.json"
ORIGINS = {"paper", "authors' leaderboard", "RobustSSL_Benchmark reproduction", "third-party report"}


def test_rows_name_registered_methods_valid_settings_origins_and_percentages():
    table = json.loads(PATH.read_text())
    assert set(table["origins"]) == ORIGINS
    for row in table["rows"]:
        assert row["method"] in METHODS and row["finetuner"] in ("slf", "alf", "aff", None)
        assert row["source"] in ("cifar10", "cifar100", "stl10") and row["target"] in ("cifar10", "cifar100", "stl10")
        assert row["origin"] in ORIGINS and row["protocol"] == table["origins"][row["origin"]]["protocol"]
        assert all(0 < row[m] < 100 for m in ("aa", "sa") if row.get(m) is not None)
        resolve(row.get("settings", {}), [row["method"]])  # a variant's settings are valid harness settings
    leaderboard = {(r["label"], r["finetuner"], r["source"], r["target"]): (r["aa"], r["sa"])
                   for r in table["rows"] if r["origin"] == "authors' leaderboard"}
    assert leaderboard[("DynACL-AIR++", "slf", "cifar10", "cifar10")] == (46.99, 81.80)
    assert leaderboard[("DynACL-RCS", "aff", "cifar100", "cifar100")] == (24.77, 56.92)
