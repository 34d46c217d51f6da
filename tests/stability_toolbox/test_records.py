"""stability_toolbox.records: monitor.jsonl written as strict JSON and read back with its non-finite values,
the log_dir check, the summary table and the heatmaps of a history."""

import json
import logging
import math

import pytest

from stability_toolbox.records import RecordWriter, _json_safe, as_log_dir, read_records, summary_table, \
    write_heatmaps

NAN, INF = float("nan"), float("inf")


def _record(step, beta, loss=1.0):
    return {"step": step, "loss": loss, "loss_max": loss, "log_z_rms": 2.0,
            "quantities": {"beta": {"layers.0": beta, "layers.1": 0.5}, "grad_norm": {"layers.0": 1.0 + step}},
            "warnings": []}


def _same(a, b):
    """Equal, NaN equal to NaN, through dicts and lists."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and type(a) is type(b)


def test_json_safe_writes_non_finite_floats_as_strings_everywhere():
    value = {"a": NAN, "b": [INF, -INF, (1.5, NAN)], "c": {"d": -INF, "e": 2}, "f": "NaN", "g": None}
    safe = _json_safe(value)
    assert safe == {"a": "NaN", "b": ["Infinity", "-Infinity", [1.5, "NaN"]], "c": {"d": "-Infinity", "e": 2},
                    "f": "NaN", "g": None}
    json.dumps(safe, allow_nan=False)  # strict JSON


def test_written_records_read_back_as_the_history_held_them(tmp_path):
    history = [_record(0, 0.25), _record(10, NAN, loss=INF), _record(20, -INF, loss=NAN)]
    history[1]["log_z"] = -INF
    history[2]["warnings"] = ["stability warning: layer layers.0: beta is non-finite (-inf) at step 20; NaN"]
    writer = RecordWriter(tmp_path / "new" / "dir", tensorboard=False, log=logging.getLogger("test"))
    for record in history:
        writer.write(record)
    writer.close()
    path = tmp_path / "new" / "dir" / "monitor.jsonl"
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = read_records(path)
    assert all(_same(h, b) for h, b in zip(history, back)) and len(back) == 3
    assert back[2]["warnings"] == history[2]["warnings"]  # warning text is not read as numbers
    assert not (tmp_path / "new" / "dir" / "tb").exists()
    # a second writer on the same directory appends (a second run of the monitor)
    writer = RecordWriter(tmp_path / "new" / "dir", tensorboard=False, log=logging.getLogger("test"))
    writer.write(_record(30, 0.1))
    writer.close()
    assert [r["step"] for r in read_records(path)] == [0, 10, 20, 30]


def test_read_records_skips_blank_lines_and_keeps_the_step(tmp_path):
    path = tmp_path / "monitor.jsonl"
    path.write_text('{"step": 3, "quantities": {"beta": {"x": "Infinity"}}}\n\n  \n{"step": 4}\n', encoding="utf-8")
    assert read_records(path) == [{"step": 3, "quantities": {"beta": {"x": INF}}}, {"step": 4, "quantities": {}}]


def test_as_log_dir(tmp_path):
    assert as_log_dir(None) is None
    assert as_log_dir(str(tmp_path / "x")) == tmp_path / "x"
    with pytest.raises(TypeError, match="log_dir"):
        as_log_dir(3)
    with pytest.raises(ValueError, match="non-empty"):
        as_log_dir("")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        as_log_dir(tmp_path / "file")


def test_summary_table_first_last_and_largest_finite_value():
    assert summary_table([], [], every=10, n_sites=2, mechanism="m") == "(stability monitor: no logged step)"
    history = [_record(0, 0.25), _record(10, 0.75), _record(20, NAN)]
    history[0]["quantities"]["act_max"] = {"layers.0": NAN}
    text = summary_table(history, [{"message": "stability warning: x"}], every=10, n_sites=2,
                         mechanism="layer descriptions")
    lines = text.splitlines()
    assert lines[0] == "stability monitor: 3 logged steps (every 10), 2 sublayers via layer descriptions; 1 warnings"
    assert "| beta | layers.0 | 0.25 | nan | 0.75 | 10 |" in lines
    assert "| act_max | layers.0 | nan | nan | nan | 0 |" in lines  # no finite value: nan at the last step
    assert lines.index("| beta | layers.1 | 0.5 | 0.5 | 0.5 | 0 |") < \
        lines.index("| grad_norm | layers.0 | 1 | 21 | 21 | 20 |")  # QUANTITIES' order
    assert lines[-1] == "stability warning: x"


def test_write_heatmaps_one_png_per_quantity_present(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_heatmaps([], tmp_path, every=10) == []
    history = [_record(0, 0.25), _record(10, NAN), _record(20, 0.5)]
    paths = write_heatmaps(history, tmp_path / "maps", every=10)
    assert [p.name for p in paths] == ["heatmap_beta.png", "heatmap_grad_norm.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
