"""The report beyond the paper's layouts, on hand-built records: an L2 and an L-inf evaluation of one
classifier are two results (L2 in its own table), outside rows are named and marked, corruption
records become tables, CSV rows and the accuracy-against-severity figure."""

from __future__ import annotations

from report_store import metric, ra_protocol, write_eval

from bench.record import Record
from bench.report import build_tables, load_results, render, write_report
from bench.store import Store


def l2_protocol() -> dict:
    return {"attack": "pgd", "norm": "L2", "eps": 0.5, "eps_255": 127.5, "alpha_255": 31.875, "steps": 20,
            "restarts": 1}


def corruption_metrics(correct_per_cell: int, n: int = 10, source: str = "official") -> dict:
    cells = {c: {str(s): metric(correct_per_cell, n, corruption=c, severity=s, source=source,
                                corrupted_by="official CIFAR-10-C" if source == "official" else "generated (x)")
                 for s in (1, 2, 3, 4, 5)} for c in ("fog", "snow")}
    pooled = lambda k, **p: metric(correct_per_cell * k, n * k, source=source,  # noqa: E731
                                   corrupted_by="official CIFAR-10-C" if source == "official" else "generated (x)",
                                   **p)
    return {"mean": pooled(10), "source": source, "cells": cells,
            "per_corruption": {c: pooled(5, corruption=c) for c in cells},
            "per_severity": {str(s): pooled(2, severity=s) for s in (1, 2, 3, 4, 5)}}


def build(root) -> Store:
    store = Store(root)
    linf = write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=800, ra=450, aa=400,
                      config={"eval": {"norm": "Linf"}})
    ft_key = store.read(linf).inputs["classifier"]
    l2 = Record(kind="evaluate", key="evaluate-acl-slf-cifar10-s0-l2l2l2l2l2l2", seed=0, method="acl",
                finetuner="slf", source="cifar10", target="cifar10", config={"eval": {"norm": "L2"}},
                inputs={"classifier": ft_key},
                metrics={"sa": metric(800, attack=None), "ra": metric(600, **l2_protocol()), "aa": None})
    store.write(l2)
    # an outside classifier evaluated as given: a named checkpoint job, then its evaluate job
    store.write(Record(kind="checkpoint", key="checkpoint-Released-cifar10-s0-aaaaaaaaaaaa", seed=0,
                       method="Released", source="cifar10", config={"checkpoint": {"format": "acl"}},
                       metrics={"format": "acl", "source": "/x/model.pt", "kind": "classifier",
                                "stored": "classifier.pt"}))
    store.write(Record(kind="evaluate", key="evaluate-Released-cifar10-s0-bbbbbbbbbbbb", seed=0, method="Released",
                       source="cifar10", target="cifar10", config={"eval": {"norm": "Linf"}},
                       inputs={"classifier": "checkpoint-Released-cifar10-s0-aaaaaaaaaaaa"},
                       metrics={"sa": metric(700, attack=None), "ra": metric(300, **ra_protocol()), "aa": None}))
    for seed, (correct, source) in enumerate([(6, "official"), (4, "generated")]):
        method = "acl" if source == "official" else "Released"
        store.write(Record(kind="corruptions", key=f"corruptions-{method}-cifar10-s0-{seed}ccccccccccc", seed=0,
                           method=method, finetuner="slf" if method == "acl" else None, source="cifar10",
                           target="cifar10", config={"corruptions": {"n": 10}},
                           flags=["corruptions_generated"] if source == "generated" else [],
                           metrics=corruption_metrics(correct, source=source)))
    return store


def test_l2_and_linf_are_two_results_and_outside_rows_are_marked(tmp_path):
    build(tmp_path / "results")
    results = load_results(tmp_path / "results")
    key = ("acl", "slf", "cifar10", "cifar10")
    assert results.cells[key].metrics["ra"].mean == 0.45 and results.threat_cells["L2"][key].metrics["ra"].mean == 0.6
    assert not any("configurations" in n for n in results.notes)
    assert ("Released", "none", "cifar10", "cifar10") in results.cells
    assert results.method_label("Released") == "Released (outside: acl)" and results.method_label("acl") == "ACL"
    tables = build_tables(results)
    assert [t.id for t in tables] == ["table1", "threat_l2", "corruptions", "corruptions_per_kind"]
    md = render("md", results, tables=tables)
    table1 = md.split("### Table 1")[1].split("###")[0]
    assert "| Released (outside: acl) | as given |" in table1 and "45.00" in table1 and "60.00" not in table1
    l2 = md.split("### L2 threat model, eps 0.5")[1].split("###")[0]
    row = next(line for line in l2.splitlines() if line.startswith("| ACL |"))
    assert "60.00" in row and "(" not in row  # no published value beside it (the paper is L-inf only)
    csv_text = render("csv", results)
    assert "acl,ACL,slf,SLF,cifar10,cifar10,CIFAR-10,False,ra,,,1,0,60.0" in csv_text
    assert ",Linf" in csv_text and ",L2" in csv_text and "corruptions:official" in csv_text


def test_corruption_tables_mark_generated_cells_and_draw_accuracy_against_severity(tmp_path):
    build(tmp_path / "results")
    results = load_results(tmp_path / "results")
    md = render("md", results)
    mean = md.split("### Common corruptions: mean corruption accuracy")[1].split("### ")[0]
    acl_row = next(line for line in mean.splitlines() if line.startswith("| ACL |"))
    released_row = next(line for line in mean.splitlines() if line.startswith("| Released (outside: acl) |"))
    assert "60.00" in acl_row and "§" not in acl_row and "40.00" in released_row and "§" in released_row
    per_kind = md.split("### Common corruptions: accuracy per corruption")[1]
    assert "Fog" in per_kind and "Snow" in per_kind
    out = tmp_path / "report"
    report = write_report(results, out, tsne=False)
    names = [f.name for f in report.figures]
    assert "corruptions_by_severity_cifar10_cifar10" in names
    assert (out / "figures" / "corruptions_by_severity_cifar10_cifar10.pdf").is_file()
    html = (out / "report.html").read_text()
    assert 'id="threat_l2"' in html and 'id="corruptions"' in html and "Released (outside: acl)" in html
    assert "L2 threat model" in (out / "report.tex").read_text()
