import json
import subprocess
import sys

import pytest

from bench.errors import BenchError
from bench.record import SCHEMA_VERSION, Metric, Record, wilson_interval
from bench.store import Store


def _record(key="evaluate-x", **kw):
    return Record(kind="evaluate", key=key, seed=0, method="advcl", finetuner="slf", source="cifar10",
                  target="cifar10", metrics={"sa": Metric.from_counts(80, 100, {"n": 100})}, **kw)


def test_record_round_trip(tmp_path):
    store = Store(tmp_path)
    store.write(_record())
    again = store.read("evaluate-x")
    assert again.metrics["sa"]["value"] == 0.8 and again.metrics["sa"]["n"] == 100
    assert again.schema == SCHEMA_VERSION
    assert Record.from_json(again.to_json()) == again


def test_wilson_interval():
    lo, hi = wilson_interval(80, 100)
    assert lo == pytest.approx(0.7112, abs=1e-3) and hi == pytest.approx(0.8666, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_bad_records_are_refused_clearly(tmp_path):
    with pytest.raises(BenchError, match="not valid JSON"):
        Record.from_json("{", "r.json")
    with pytest.raises(BenchError, match="schema"):
        Record.from_json(json.dumps({"schema": 99, "kind": "evaluate", "key": "k", "seed": 0}))
    with pytest.raises(BenchError, match="unknown fields"):
        Record.from_json(json.dumps({"schema": SCHEMA_VERSION, "kind": "evaluate", "key": "k", "seed": 0, "x": 1}))
    store = Store(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "record.json").write_text("{")
    store.write(_record("good"))
    assert [r.key for r in store.records()] == ["good"]


def test_writes_are_atomic(tmp_path):
    store = Store(tmp_path)
    store.write(_record())
    leftovers = [p for p in (tmp_path / "evaluate-x").iterdir() if p.name != "record.json"]
    assert leftovers == []


def test_lock_excludes_a_second_process(tmp_path):
    store = Store(tmp_path)
    code = ("import sys; from bench.store import Store, JobLocked\n"
            "try:\n  with Store(sys.argv[1]).lock('j'): sys.exit(0)\n"
            "except JobLocked: sys.exit(3)\n")
    with store.lock("j"):
        held = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert (held.returncode, free.returncode) == (3, 0)


def test_provenance_fields():
    from bench.record import provenance
    import time

    prov = provenance("cpu", time.time())
    assert {"git_sha", "versions", "device", "host", "duration_s"} <= set(prov)
    assert prov["versions"]["torch"] and prov["versions"]["pyautoattack"]
