"""The README's trace-report table is generated from the committed JSON, which covers every
preset in its default position mode, v1 with its four pruning layers."""
import json

import trace_report


def test_readme_table_is_the_committed_json():
    result = json.loads(trace_report.JSON_PATH.read_text())
    readme = trace_report.README.read_text()
    block = readme.split(trace_report.BEGIN)[1].split(trace_report.END)[0]
    assert block.strip() == trace_report.table(result)


def test_committed_rows_cover_each_preset_in_its_position_mode():
    rows = json.loads(trace_report.JSON_PATH.read_text())["rows"]
    runs = {(r["preset"], r["positions"]): r for r in rows}
    assert {("v1", "renumber"), ("v1.5", "renumber"), ("v1.5", "original"), ("v2", "original")} <= set(runs)
    assert runs[("v1", "renumber")]["pruning_layers"] == [2, 6, 15, 19]
    v15_96 = [r for r in rows if r["preset"] == "v1.5" and r["budget"] == 96]
    # budget 96's counts 238 / 48 / 26 for 576 tokens, plus the recycled tokens
    assert all([a - c for a, c in zip(r["after_each_pruning_layer"], r["recycled_each_pruning_layer"])]
               == [238, 48, 26] for r in v15_96)
