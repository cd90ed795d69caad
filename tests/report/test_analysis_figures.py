"""Figures 5 and 6 from the analyses' records (bench.report.analysis_figures), and Figure 1 under
AutoAttack (bench.report.figures.scatter_figures(x_metric="aa"))."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.analysis.inversion import invert_feature
from bench.analysis.landscape import loss_landscape
from bench.models.resnet import Classifier, ResNet18
from report_store import build_store


def nontrivial(folder: Path, name: str) -> None:
    from PIL import Image

    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    assert png.stat().st_size > 3000 and pdf.read_bytes()[:5] == b"%PDF-", name
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, name


def roundtrip(record: dict) -> dict:
    return json.loads(json.dumps(record))  # what a job's record.json gives back


def fim_entry(method: str, seed: int, direction: str = "max", coordinate: int = 3, **where) -> dict:
    torch.manual_seed(seed)
    encoder = ResNet18(width=4).eval()
    x0 = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    out = invert_feature(encoder, x0, coordinate=coordinate, direction=direction, steps=3, step_size=2.0)
    return {"method": method, "seed": 0, **where, **roundtrip(out.to_record())}


def test_figure5_rows_seed_images_columns_methods(tmp_path):
    from bench.report.analysis_figures import fim_figures

    entries = [fim_entry("advcl", 0, source="cifar10", target="cifar10"),
               fim_entry("acl", 1, source="cifar10", target="cifar10"),
               fim_entry("simclr", 2, source="cifar10", target="cifar10")]
    made = fim_figures(entries, tmp_path)
    assert [f.name for f in made] == ["fig5_fim_cifar10_cifar10"]
    nontrivial(tmp_path, "fig5_fim_cifar10_cifar10")
    assert "maximising" in made[0].caption and "the paper's formula writes a minimisation" in made[0].caption
    assert "neuron 3" in made[0].title and "differ" not in made[0].caption
    # the paper's formula as written, beside the default: one figure per setting, named apart
    both = fim_figures(entries + [fim_entry("advcl", 0, "min", source="cifar10", target="cifar10")], tmp_path / "b")
    assert sorted(f.name for f in both) == ["fig5_fim_cifar10_cifar10_i3_max", "fig5_fim_cifar10_cifar10_i3_min"]
    low = next(f for f in both if f.name.endswith("min"))
    assert "minimising" in low.caption
    # float channel-first images (an artifact's arrays) and seeds that differ are drawn too, and said so
    odd = dict(entries[1], seeds=np.random.default_rng(0).random((3, 3, 16, 16)),
               images=np.random.default_rng(1).random((3, 3, 16, 16)), values=None)
    (fig,) = fim_figures([entries[0], odd], tmp_path / "c")
    assert "Column 1 shows ACL's seed images; those of AdvCL differ" in fig.caption  # paper order: ACL first
    nontrivial(tmp_path / "c", fig.name)


@pytest.fixture(scope="module")
def landscape_entries():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(4))
    entries = []
    for k, method in enumerate(("advcl", "acl")):
        torch.manual_seed(k)
        model = Classifier(ResNet18(width=4), 3).eval()
        out = loss_landscape(model, x, y, n=8, points_1d=5, points_2d=4, steps=1, batch_size=8)
        entries.append({"method": method, "source": "cifar10", "target": "cifar10", "finetuner": "slf", "seed": 0,
                        **roundtrip(out.to_record())})
    return entries


def test_figure6_curves_on_one_axis_and_a_contour_per_method(landscape_entries, tmp_path):
    from bench.report.analysis_figures import landscape_figures

    curve_only = dict(landscape_entries[0], method="simclr", surface=None)
    variant = dict(landscape_entries[1], label="ACL (variant)")
    made = landscape_figures(landscape_entries + [curve_only, variant], tmp_path)
    assert [f.name for f in made] == ["fig6_landscape_1d_cifar10_cifar10_slf", "fig6_landscape_2d_cifar10_cifar10_slf"]
    for f in made:
        nontrivial(tmp_path, f.name)
    assert "filter-normalised" in made[0].caption and "PGD-1" in made[0].caption and "n = 8" in made[0].caption
    assert "Li et al." in made[1].caption


def test_figure1_under_autoattack(tmp_path, monkeypatch):
    from bench.report import figures, load_results

    build_store(tmp_path / "results")
    results = load_results(tmp_path / "results")
    labels: dict[str, list[str]] = {}
    real_save = figures.save

    def save(fig, folder, name, title, caption):
        labels[name] = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
        from matplotlib.collections import PathCollection

        hollow = [c for ax in fig.axes for c in ax.collections
                  if isinstance(c, PathCollection) and len(c.get_facecolors()) == 0]
        labels[name + ":hollow"] = sorted(f"{x:.2f}" for c in hollow for x, _ in c.get_offsets())
        return real_save(fig, folder, name, title, caption)

    monkeypatch.setattr(figures, "save", save)
    made = figures.scatter_figures(results, tmp_path / "aa", x_metric="aa")
    # cells without AA (the synthetic ones, supervised ALF) are left out: no synthetic figure
    assert sorted(f.name for f in made) == ["fig1_sa_vs_aa_cifar10_cifar10", "fig1_sa_vs_aa_cifar10_stl10"]
    assert labels["fig1_sa_vs_aa_cifar10_cifar10"] == ["AA (%) — AutoAttack standard, 8/255"] * 2  # SLF, AFF panels
    # hollow: the paper's AA of AdvCL, ACL, RoCL after SLF and of AdvCL after AFF
    assert labels["fig1_sa_vs_aa_cifar10_cifar10:hollow"] == ["28.38", "39.13", "42.57", "49.77"]
    assert "AutoAttack" in made[0].caption and made[0].title.startswith("SA against AA")
    for f in made:
        nontrivial(tmp_path / "aa", f.name)
    # the RA version is unchanged
    ra = figures.scatter_figures(results, tmp_path / "ra")
    assert sorted(f.name for f in ra) == ["fig1_sa_vs_ra_cifar10_cifar10", "fig1_sa_vs_ra_cifar10_stl10",
                                          "fig1_sa_vs_ra_synthetic_synthetic"]
    assert labels["fig1_sa_vs_ra_cifar10_cifar10"][0].startswith("RA (%) — PGD-20, 8/255")
