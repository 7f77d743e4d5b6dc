"""Results JSON, Markdown tables (checked against hand-written text) and the accuracy-vs-DSP plot."""

import json
import os

import pytest

from cmkd.benchmarks import load_benchmark_config
from recipes.core.tables import (
    RESULTS_FILENAME,
    add_result,
    load_results,
    new_results,
    plot_accuracy_vs_dsp,
    render_markdown,
    render_matrix_tables,
    save_results,
    write_report,
)

OFFICE31_TASKS = ["A->D", "A->W", "D->A", "D->W", "W->A", "W->D"]


@pytest.fixture
def office31_results():
    # accuracies of the paper's Table II (ViT-B/16 CLIP and Baseline rows); DSPs made up per task
    res = new_results(load_benchmark_config("office31"), meta={"backbone": "vit_b16"})
    for task, acc in zip(OFFICE31_TASKS, [0.743, 0.678, 0.726, 0.678, 0.726, 0.743]):
        add_result(res, "CLIP", task, acc, 0)
    for task, acc in zip(OFFICE31_TASKS, [0.873, 0.858, 0.763, 0.987, 0.759, 1.0]):
        add_result(res, "Baseline", task, acc, 86_208_512)  # 86,192,640 encoder + 512 x 31 head
    add_result(res, "CMKD+RST", "A->D", 0.952, 50_000)
    add_result(res, "CMKD+RST", "A->W", 0.968, 60_000)
    return res


def test_small_dsp_keeps_four_significant_digits():
    """A tiny model's DSP (thousands of entries) must not print as 0.00 M next to zero-shot's true 0."""
    res = new_results(load_benchmark_config("office31"))
    add_result(res, "CLIP", "A->D", 0.5, 0)
    add_result(res, "CMKD+RST", "A->D", 0.6, 1_093)
    add_result(res, "CMKD", "A->D", 0.7, 170_000)
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |")
        for line in render_markdown(res).splitlines()
        if line.startswith("| C")
    }
    assert rows == {"CLIP": "0.00", "CMKD+RST": "0.001093", "CMKD": "0.17"}


def test_task_table_matches_paper_layout(office31_results):
    expected = (
        "## Office-31: accuracy (%)\n"
        "\n"
        "| Method | A→D | A→W | D→A | D→W | W→A | W→D | Avg. | DSP(M) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| CLIP | 74.3 | 67.8 | 72.6 | 67.8 | 72.6 | 74.3 | 71.6 | 0.00 |\n"
        "| Baseline | 87.3 | 85.8 | 76.3 | 98.7 | 75.9 | 100.0 | 87.3 | 517.25 |\n"
        "| CMKD+RST | 95.2 | 96.8 | – | – | – | – | 96.0* | 0.11 |\n"
        "\n"
        "\\* average over the tasks finished so far (CMKD+RST).\n"
    )
    assert render_markdown(office31_results) == expected


def test_per_class_table_for_visda():
    res = new_results(load_benchmark_config("visda"))
    add_result(res, "CLIP", "Syn->Real", 0.94967, 0, per_class={"aeroplane": 0.993, "bicycle": 0.917, "bus": 0.939})
    add_result(
        res, "CMKD", "Syn->Real", 0.95167, 86_210_000, per_class={"aeroplane": 0.994, "bicycle": 0.946, "bus": 0.915}
    )
    expected = (
        "## VisDA-2017: mean per-class accuracy (%)\n"
        "\n"
        "Task: Syn→Real\n"
        "\n"
        "| Method | aeroplane | bicycle | bus | Avg. | DSP(M) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| CLIP | 99.3 | 91.7 | 93.9 | 95.0 | 0.00 |\n"
        "| CMKD | 99.4 | 94.6 | 91.5 | 95.2 | 86.21 |\n"
    )
    assert render_markdown(res) == expected


def test_matrix_table_for_domainnet_layout():
    res = {
        "display_name": "Toy",
        "metric": "accuracy",
        "table_layout": "matrix",
        "domains": ["a", "b", "c"],
        "tasks": ["a->b", "a->c", "b->a", "b->c", "c->a", "c->b"],
        "methods": {},
    }
    for task, acc in zip(res["tasks"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]):
        add_result(res, "M", task, acc, 1_000_000)
    expected = (
        "**M** (DSP(M) 6.00)\n"
        "\n"
        "| M | a | b | c | Avg. |\n"
        "|---|---:|---:|---:|---:|\n"
        "| a | – | 50.0 | 60.0 | 55.0 |\n"
        "| b | 70.0 | – | 80.0 | 75.0 |\n"
        "| c | 90.0 | 100.0 | – | 95.0 |\n"
        "| Avg. | 80.0 | 75.0 | 70.0 | 75.0 |"
    )
    assert render_matrix_tables(res) == expected
    md = render_markdown(res)
    assert md.startswith("## Toy: accuracy (%)\n\n" + expected)
    assert "| M | 50.0 | 60.0 | 70.0 | 80.0 | 90.0 | 100.0 | 75.0 | 6.00 |" in md


def test_add_result_validation(office31_results):
    with pytest.raises(ValueError, match="divide percentages by 100"):
        add_result(office31_results, "X", "A->D", 87.3, 0)
    with pytest.raises(ValueError, match="non-negative parameter count"):
        add_result(office31_results, "X", "A->D", 0.5, -1)
    with pytest.raises(ValueError, match="must look like"):
        add_result(office31_results, "X", "AD", 0.5, 0)
    with pytest.raises(ValueError, match="per-class accuracy"):
        add_result(office31_results, "X", "A->D", 0.5, 0, per_class={"mug": 2.0})
    add_result(office31_results, "X", "A->X", 0.5, 0)  # a pair outside the paper's list becomes an extra column
    assert office31_results["tasks"][-1] == "A->X"


def test_json_roundtrip(tmp_path, office31_results):
    path = save_results(office31_results, tmp_path / "r" / "results.json")
    assert load_results(path) == office31_results
    assert json.loads(path.read_text())["methods"]["CMKD+RST"]["A->W"] == {"accuracy": 0.968, "dsp": 60000}
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a results file"):
        load_results(tmp_path / "other.json")


def test_unserialisable_results_write_nothing(tmp_path, office31_results):
    office31_results["meta"]["bad"] = object()  # not JSON-serialisable: fails before anything is written
    with pytest.raises(TypeError):
        save_results(office31_results, tmp_path / "results.json")
    assert os.listdir(tmp_path) == []


def test_plot_and_report(tmp_path, office31_results):
    png = plot_accuracy_vs_dsp(office31_results, tmp_path / "plot.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    out = tmp_path / "run"
    paths = write_report(office31_results, out)
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_dsp.png", "results.json", "results.md"]
    assert paths["markdown"].read_text() == render_markdown(office31_results)
    assert (
        paths["json"] == out / RESULTS_FILENAME
    )  # the JSON marks the run finished (tests/recipes/test_recipes_config)


def test_empty_results_render(tmp_path):
    res = new_results(load_benchmark_config("digits"))
    assert render_markdown(res) == "## Digits: accuracy (%)\n\n_no results yet_\n"
    assert plot_accuracy_vs_dsp(res, tmp_path / "p.png").exists()


def test_selection_table_shows_last_pick_oracle_and_gap_and_unlabeled_cells():
    from cmkd.benchmarks import load_benchmark_config
    from recipes.core.tables import add_result, new_results, render_markdown

    results = new_results(load_benchmark_config("office_home"))
    results["tasks"] = ["Ar->Cl", "Ar->photos"]
    sel = {
        "metric": "zs_agreement",
        "value": 0.9,
        "accuracy": 0.70,
        "last": {"accuracy": 0.68},
        "oracle": {"accuracy": 0.735},
        "gap": 0.035,
    }
    add_result(results, "CMKD", "Ar->Cl", 0.70, 10, selection=sel)
    add_result(results, "CMKD", "Ar->photos", None, 10, selection={"metric": "zs_agreement", "value": 0.8})
    text = render_markdown(results)
    assert "| CMKD | 70.0 | – | 70.0† | 2e-05 |" in text  # the unlabeled task shows "–" and is left out of Avg.
    assert "† average over the tasks with target labels" in text
    assert (
        "| Method | Task | Selection | Last | Label-free pick | oracle (uses target labels) | Gap (points) |" in text
    )
    assert "| CMKD | Ar→Cl | zs_agreement | 68.0 | 70.0 | 73.5 | 3.5 |" in text
    assert "| CMKD | Ar→photos | zs_agreement | – | – | – | – |" in text
