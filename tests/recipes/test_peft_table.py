"""recipes.peft_table: the PeftRow format, Table VII's markdown layout, the accuracy-vs-DSP plot, atomic writes."""

import re

import pytest
from matplotlib.figure import Figure
from PIL import Image

from cmkd import PEFT_LABELS
from recipes.peft_table import PLOT_NAME, TABLE_NAME, PeftRow, render_table_vii, write_table_vii

TASKS = ("Ar->Cl", "Ar->Pr")


def rows():
    return [
        PeftRow(
            "full", {"Ar->Cl": 0.794, "Ar->Pr": 0.942}, {"Ar->Cl": 86_230_000, "Ar->Pr": 86_230_000}, "last checkpoint"
        ),
        PeftRow(
            "rst",
            {"Ar->Cl": 0.789, "Ar->Pr": 0.938},
            {"Ar->Cl": 80_000, "Ar->Pr": 90_000},
            "oracle (uses target labels)",
            settings="tau=1e-06",
            std={"Ar->Cl": 0.01, "Ar->Pr": 0.002},
            seeds=3,
        ),
        PeftRow(
            "linear_probe", {"Ar->Cl": 0.765, "Ar->Pr": 0.93}, {"Ar->Cl": 34_000, "Ar->Pr": 34_000}, "last checkpoint"
        ),
    ]


def table_rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_row_properties_are_the_mean_and_the_sum():
    full = rows()[0]
    assert full.label == PEFT_LABELS["full"] == "Fine-tuning"
    assert full.average == pytest.approx((0.794 + 0.942) / 2)
    assert full.dsp_total == 172_460_000
    assert full.tasks == TASKS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="prefix"), "not one of rst, lora"),
        (dict(accuracy={"Ar->Cl": 79.4, "Ar->Pr": 0.9}), "fraction in"),
        (dict(dsp={"Ar->Cl": 1}), "same tasks"),
        (dict(dsp={"Ar->Cl": -1, "Ar->Pr": 2}), "int >= 0"),
        (dict(selection=" "), "naming the checkpoint rule"),
        (dict(accuracy={}, dsp={}), "no task accuracy"),
        (dict(std={"Ar->Cl": 0.1}), "std must have the same tasks"),
        (dict(seeds=0), "seeds must be an int >= 1"),
    ],
)
def test_bad_rows_are_refused(kwargs, message):
    good = dict(method="lora", accuracy={"Ar->Cl": 0.5, "Ar->Pr": 0.6}, dsp={"Ar->Cl": 1, "Ar->Pr": 2}, selection="x")
    with pytest.raises(ValueError, match=message):
        PeftRow(**{**good, **kwargs})


def test_markdown_has_table_vii_layout_with_the_selection_of_every_row():
    text = render_table_vii(rows(), title="Office-Home")
    assert text.startswith("# Office-Home\n")
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Method", "Ar→Cl", "Ar→Pr", "Avg.", "DSP(M)", "Checkpoint"
    ]  # fmt: skip
    table = table_rows(text)
    assert list(table) == ["Fine-tuning", "RST", "Linear probe"]  # the rows' order
    assert table["Fine-tuning"] == ["79.4", "94.2", "86.8", "172.46", "last checkpoint"]
    # several seeds: mean ± std per task; DSP(M) below one million keeps six decimals
    assert table["RST"] == ["78.9 ± 1.0", "93.8 ± 0.2", "86.3", "0.170000", "oracle (uses target labels)"]
    assert table["Linear probe"][3] == "0.068000"
    assert "RST: tau=1e-06" in text and "mean of 1/3 seed(s)" in text


def test_rows_must_share_tasks_and_methods_appear_once(tmp_path):
    other = PeftRow("lora", {"Ar->Cl": 0.5}, {"Ar->Cl": 1}, "last checkpoint")
    with pytest.raises(ValueError, match="same tasks"):
        write_table_vii([rows()[0], other], tmp_path)
    with pytest.raises(ValueError, match="once"):
        write_table_vii([rows()[0], rows()[0]], tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        write_table_vii([], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_writes_table_and_a_log_x_plot_with_one_point_per_method(tmp_path, monkeypatch):
    figures = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    paths = write_table_vii(rows(), tmp_path / "out")
    assert [p.name for p in paths] == [TABLE_NAME, PLOT_NAME]
    assert paths[0].read_text(encoding="utf-8") == render_table_vii(rows())
    with Image.open(paths[1]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "log"
    points = [float(v) for c in ax.collections for v in c.get_offsets()[0]]
    expected = [v for r in rows() for v in (r.dsp_total / 1e6, 100 * r.average)]
    assert points == pytest.approx(expected)
    assert [t.get_text() for t in ax.texts] == [PEFT_LABELS[m] for m in ("full", "rst", "linear_probe")]
    assert re.search("oracle \\(uses target labels\\)", ax.get_title())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([TABLE_NAME, PLOT_NAME])  # no temp files


def test_a_failed_write_leaves_the_previous_files(tmp_path, monkeypatch):
    write_table_vii(rows()[:2], tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_table_vii(rows(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_comparison_driver_writes_one_row_per_method_on_the_embedded_world(tmp_path):
    from recipes import peft_comparison

    lines = []
    build, tasks = peft_comparison.toy_world()
    args = peft_comparison.CMKDTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, use_cpu=True, disable_tqdm=True, report_to="none",
        **{**peft_comparison.TOY_ARGS, "per_device_train_batch_size": 8},
    )  # fmt: skip
    got = peft_comparison.run_peft_comparison(
        build, tasks, args, tmp_path, ["adalora", "linear_probe"], seeds=[1], log=lines.append
    )
    assert [r.method for r in got] == ["adalora", "linear_probe"]
    assert all(r.selection == "last checkpoint" and 0 <= r.average <= 1 for r in got)
    assert got[0].dsp_total > got[1].dsp_total > 0
    assert lines[0].startswith("method 1 of 2: AdaLoRA (rank 2 -> 1)")
    with pytest.raises(ValueError, match="unknown PEFT method"):
        peft_comparison.run_peft_comparison(build, tasks, args, tmp_path, ["prefix"])
