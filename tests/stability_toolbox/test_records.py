"""stability_toolbox.records: monitor.jsonl written as strict JSON and read back with its non-finite values,
the log_dir check, the summary table and the heatmaps of a history; what read_records does with a torn last
line (a crash), a corrupt line and a line that is not a record; paths only; refused records, resumed runs,
concurrent writers, pickling and TensorBoard names."""

import copy
import json
import logging
import math
import os
import pickle
import struct
import threading
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stability_toolbox.records import RecordWriter, _json_safe, as_log_dir, read_records, summary_table, \
    write_heatmaps, write_summary

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


# ---------------------------------------------------------------- reading a monitor.jsonl: the contract

def _write_lines(path, lines, end="\n"):
    path.write_bytes("".join(line + end for line in lines).encode("utf-8"))


def _records_of(history):
    """JSON lines of ``history`` written out here (strict JSON, non-finite values as strings)."""
    def safe(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return {k: safe(x) for k, x in v.items()} if isinstance(v, dict) else v
    return [json.dumps(safe(h)) for h in history]


@pytest.mark.parametrize("cut", [1, 7, 20, -2, -1])
def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, cut):
    """A crash while appending leaves the last line cut short (no end of line): the records before it are read,
    and a UserWarning names the file and the line."""
    history = [_record(0, 0.25), _record(10, NAN, loss=INF), _record(20, 0.5)]
    lines = _records_of(history)
    path = tmp_path / "monitor.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:cut], encoding="utf-8")
    with pytest.warns(UserWarning, match=r"monitor\.jsonl: line 3 is torn"):
        back = read_records(path)
    assert len(back) == 2 and all(_same(h, b) for h, b in zip(history, back))


def test_an_unterminated_last_line_that_is_whole_is_read(tmp_path, recwarn):
    path = tmp_path / "monitor.jsonl"
    path.write_text('{"step": 0, "quantities": {}}\n{"step": 1, "loss": "NaN"}', encoding="utf-8")
    back = read_records(path)
    assert [r["step"] for r in back] == [0, 1] and math.isnan(back[1]["loss"]) and not recwarn.list


@settings(max_examples=25)
@given(cut=st.integers(0, 10_000))
def test_any_crash_point_gives_the_whole_records_before_it(tmp_path_factory, cut):
    """The file cut at any byte (a crash at any moment of an append): read_records gives exactly the records
    whose line was complete (its closing brace written), and warns iff a partial record follows them."""
    history = [_record(s, b) for s, b in ((0, 0.25), (10, NAN), (20, -INF), (30, 1e300))]
    history[1]["quantities"]["beta"]["сло́й.ü"] = 2.0   # non-ASCII names: escaped, so a cut never splits a char
    data = "".join(line + "\n" for line in _records_of(history)).encode()
    cut %= len(data) + 1
    ends = [i for i, b in enumerate(data) if b == ord("\n")]   # each line's end of line
    whole = sum(end <= cut for end in ends)                   # lines whose "}" (just before "\n") was written
    partial = cut > (ends[whole - 1] + 1 if whole else 0) and (whole == len(ends) or cut < ends[whole])
    path = tmp_path_factory.mktemp("cut") / "monitor.jsonl"
    path.write_bytes(data[:cut])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = read_records(path)
    assert len(back) == whole and all(_same(h, b) for h, b in zip(history, back))
    assert len(caught) == int(partial)


@pytest.mark.parametrize("content, line", [
    ('{"step": 0}\n{"step": 1, "quan\n{"step": 2}\n', 2),        # a torn line in the middle: corrupt
    ('{"step": 0}\n{"step": 1, "quan\n', 2),                     # torn, then an end of line: not a crash's mark
    ('{"step": 0}\n\xff\xfe garbage\n{"step": 2}\n', 2),
    ('{"step": 0}\n' + "[" * 100_000 + "\n", 2),                  # nested beyond the parser's depth
])
def test_a_corrupt_line_is_a_value_error_naming_file_and_line(tmp_path, content, line):
    path = tmp_path / "monitor.jsonl"
    path.write_bytes(content.encode("utf-8", "surrogateescape") if "\xff" not in content
                     else content.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"monitor\.jsonl, line {line}: not (JSON|UTF-8)"):
        read_records(path)


@pytest.mark.parametrize("line, field", [
    ("[1, 2]", "JSON list"), ('"step"', "JSON str"), ("3", "JSON int"), ("null", "JSON NoneType"),
    ('{"loss": 1.0}', "no 'step'"), ('{"step": "3"}', r"\['step'\] must be an integer"),
    ('{"step": true}', r"\['step'\] must be an integer"), ('{"step": 3.0}', r"\['step'\] must be an integer"),
    ('{"step": 1, "quantities": [1]}', r"\['quantities'\] must be a dict"),
    ('{"step": 1, "quantities": {"beta": 0.5}}', r"\['quantities'\]\['beta'\] must be a dict"),
    ('{"step": 1, "quantities": {"beta": {"l.0": "high"}}}', r"\['quantities'\]\['beta'\]\['l.0'\] must be a real"),
    ('{"step": 1, "quantities": {"beta": {"l.0": null}}}', r"\['beta'\]\['l.0'\] must be a real"),
    ('{"step": 1, "quantities": {"beta": {"l.0": 1' + "0" * 400 + '}}}', "fits a float"),
    ('{"step": 1, "loss": "high"}', r"\['loss'\] must be a real"),
    ('{"step": 1, "warnings": "stability warning: x"}', r"\['warnings'\] must be a list of str"),
])
def test_a_json_line_that_is_not_a_record_is_a_value_error(tmp_path, line, field):
    path = tmp_path / "monitor.jsonl"
    _write_lines(path, ['{"step": 0, "quantities": {}}', line])
    with pytest.raises(ValueError, match=rf"monitor\.jsonl, line 2: not a monitor record: .*{field}"):
        read_records(path)


def test_read_records_takes_paths_only(tmp_path):
    """An int is a TypeError naming path, and the caller's file descriptor stays open; bytes and None too; an
    empty path or a directory is a ValueError; nothing else is read."""
    path = tmp_path / "monitor.jsonl"
    _write_lines(path, ['{"step": 0}'])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TypeError, match=r"path must be a file path \(str or os\.PathLike\), got \d+ \(int\)"):
            read_records(fd)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    for bad in (str(path).encode(), None, [str(path)]):
        with pytest.raises(TypeError, match="path must be a file path"):
            read_records(bad)
    with pytest.raises(ValueError, match="path must be a non-empty file path"):
        read_records("")
    with pytest.raises(ValueError, match="is a directory; give the monitor.jsonl file in it"):
        read_records(tmp_path)
    assert read_records(str(path)) == read_records(path) == [{"step": 0, "quantities": {}}]


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)
names = st.text(min_size=1, max_size=6)   # any Unicode, surrogates included


@given(st.lists(st.fixed_dictionaries({
    "step": st.integers(0, 10**6), "loss": finite_or_not, "log_z_rms": finite_or_not,
    "quantities": st.dictionaries(st.sampled_from(["beta", "grad_norm", "attn_logit_max"]),
                                  st.dictionaries(names, finite_or_not, max_size=3), max_size=3),
    "warnings": st.lists(names, max_size=2)}), max_size=4))
def test_any_history_round_trips_through_monitor_jsonl(tmp_path_factory, history):
    """NaN, infinities, huge and tiny floats, non-ASCII and surrogate names: written by RecordWriter and read
    back, the records are the history (NaN equal to NaN); the file is ASCII strict JSON."""
    log_dir = tmp_path_factory.mktemp("rt")
    writer = RecordWriter(log_dir, tensorboard=False, log=logging.getLogger("test"))
    for record in history:
        writer.write(record)
    writer.close()
    data = (log_dir / "monitor.jsonl").read_bytes()
    assert data.isascii() and data.count(b"\n") == len(history)
    back = read_records(log_dir / "monitor.jsonl")
    assert len(back) == len(history) and all(_same(h, b) for h, b in zip(history, back))


# ---------------------------------------------------------------- writing: refused records, crashes, concurrency

def _writer(log_dir, **kw):
    return RecordWriter(log_dir, tensorboard=kw.pop("tensorboard", False), log=logging.getLogger("test"), **kw)


@pytest.mark.parametrize("record, exc, match", [
    ([1], TypeError, "record must be a record"), ({"quantities": {}}, ValueError, "record has no 'step'"),
    ({"step": 0, "quantities": {"beta": {"l": "NaN"}}}, TypeError, r"record\['quantities'\]\['beta'\]\['l'\]"),
    ({"step": 0, "loss": [1.0]}, TypeError, r"record\['loss'\]"),
    ({"step": 0, "extra": {1, 2}}, TypeError, "record: a value JSON cannot write"),
])
def test_a_refused_record_writes_nothing(tmp_path, record, exc, match):
    writer = _writer(tmp_path, tensorboard=True)
    writer.write(_record(0, 0.5))
    before = (tmp_path / "monitor.jsonl").read_bytes()
    with pytest.raises(exc, match=match):
        writer.write(record)
    writer.close()
    assert (tmp_path / "monitor.jsonl").read_bytes() == before


def test_a_closed_writer_refuses_like_a_closed_file(tmp_path):
    writer = _writer(tmp_path)
    writer.close()
    writer.close()   # idempotent
    assert writer.closed
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(_record(0, 0.5))
    with pytest.raises(RuntimeError, match="closed"):
        writer.add_images([], 0)
    assert (tmp_path / "monitor.jsonl").read_bytes() == b""


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(log_dir=3, tensorboard=False, log=logging.getLogger("t")), TypeError, "log_dir"),
    (dict(log_dir=None, tensorboard=False, log=logging.getLogger("t")), TypeError, "log_dir"),
    (dict(log_dir="x", tensorboard="yes", log=logging.getLogger("t")), TypeError, "tensorboard"),
    (dict(log_dir="x", tensorboard=False, log="t"), TypeError, "log must be a logging.Logger"),
])
def test_writer_arguments_are_named(tmp_path, monkeypatch, kwargs, exc, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=match):
        RecordWriter(**kwargs)
    assert not list(tmp_path.iterdir())


def test_a_resumed_run_repairs_the_torn_line_of_the_crashed_one(tmp_path, caplog):
    """Before: a resumed run appended after the crashed run's torn line, gluing its first record to it (a
    corrupt line in the middle: the whole file unreadable). Now the writer drops the torn bytes (one warning)
    and the file reads as the crashed run's whole records followed by the resumed run's."""
    path = tmp_path / "monitor.jsonl"
    lines = _records_of([_record(0, 0.25), _record(10, 0.5), _record(20, 0.75)])
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:30], encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="test"):
        writer = _writer(tmp_path)
    assert any("torn line (30 bytes" in r.getMessage() for r in caplog.records)
    writer.write(_record(20, 0.8))
    writer.close()
    assert [(r["step"], r["quantities"]["beta"]["layers.0"]) for r in read_records(path)] == \
        [(0, 0.25), (10, 0.5), (20, 0.8)]
    # an unterminated last line that is a whole record is kept (and terminated), not dropped
    path.write_text(lines[0] + "\n" + lines[1], encoding="utf-8")
    writer = _writer(tmp_path)
    writer.write(_record(20, 0.8))
    writer.close()
    assert [r["step"] for r in read_records(path)] == [0, 10, 20]


def test_concurrent_writers_append_whole_lines(tmp_path):
    """Four writers on one log_dir in four threads, records of ~40 kB (larger than any I/O buffer): every line
    is one whole record, none lost."""
    big = {"step": 0, "quantities": {"beta": {f"layers.{i}": 0.1 * i for i in range(2000)}}}
    writers = [_writer(tmp_path) for _ in range(4)]

    def append(k):
        for i in range(10):
            writers[k].write({**big, "step": 100 * k + i})

    threads = [threading.Thread(target=append, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    back = read_records(tmp_path / "monitor.jsonl")
    assert sorted(r["step"] for r in back) == sorted(100 * k + i for k in range(4) for i in range(10))
    assert all(r["quantities"] == big["quantities"] for r in back)


def test_pickling(tmp_path):
    """Records, rules and warnings pickle; a writer (an open file) refuses to be pickled or copied, by name."""
    from stability_toolbox.warning_rules import DEFAULT_RULES, replay

    history = [_record(0, NAN), _record(10, 0.5)]
    back = pickle.loads(pickle.dumps(history))
    assert all(_same(h, b) for h, b in zip(history, back))
    assert pickle.loads(pickle.dumps(DEFAULT_RULES)) == DEFAULT_RULES
    issued = replay(history, {"beta": {"threshold": 1.0}})
    assert pickle.loads(pickle.dumps(issued)) == issued and issued
    writer = _writer(tmp_path)
    for copy_it in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="RecordWriter holds an open monitor.jsonl"):
            copy_it(writer)
    writer.write(_record(0, 0.5))   # still usable
    writer.close()
    assert len(read_records(tmp_path / "monitor.jsonl")) == 1


def _tb_scalar_tags(directory):
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.rglob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12:i + 12 + n]).summary.value}
            i += 12 + n + 4
    return tags


def test_tensorboard_takes_non_ascii_names_and_non_finite_values(tmp_path):
    pytest.importorskip("tensorboardX")
    record = {"step": 0, "loss": NAN, "quantities": {"beta": {"kodierer.schicht_ü.0": INF, "(other)": 0.5,
                                                             "a b|c": -INF}}}
    writer = _writer(tmp_path, tensorboard=True)
    writer.write(record)
    writer.close()
    tags = _tb_scalar_tags(tmp_path / "tb")
    assert {"stability/loss", "stability/beta/kodierer.schicht_ü.0", "stability/beta/_other_",
            "stability/beta/a_b_c"} <= tags


# ---------------------------------------------------------------- the summary and the heatmaps

def test_summary_and_heatmaps_refuse_a_single_record_and_bad_arguments(tmp_path):
    record = _record(0, 0.5)
    with pytest.raises(TypeError, match="history must be a sequence of records.*single record"):
        summary_table(record, [], every=10, n_sites=2, mechanism="m")
    with pytest.raises(TypeError, match="issued"):
        summary_table([record], [{"text": "x"}], every=10, n_sites=2, mechanism="m")
    with pytest.raises(ValueError, match="every"):
        summary_table([record], [], every=0, n_sites=2, mechanism="m")
    with pytest.raises(TypeError, match="history must be a sequence of records"):
        write_heatmaps(record, tmp_path, every=10)
    with pytest.raises(TypeError, match="directory must be a directory path"):
        write_heatmaps([record], 3, every=10)
    assert not list(tmp_path.iterdir())


def test_summary_escapes_a_bar_in_a_layer_name_and_is_written_atomically(tmp_path):
    text = summary_table([{"step": 0, "quantities": {"beta": {"a|b": 0.5}}}], [], every=1, n_sites=1, mechanism="m")
    assert text.splitlines()[-1] == "| beta | a\\|b | 0.5 | 0.5 | 0.5 | 0 |"
    path = write_summary(tmp_path, text)
    assert path == tmp_path / "summary.md" and path.read_text(encoding="utf-8") == text + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]   # no temporary file left


# ------------------------------------------------------------ adversarial review: files that are not record files

def _gzip_of(lines):
    import gzip
    return gzip.compress("".join(line + "\n" for line in lines).encode())


@pytest.mark.parametrize("content, match", [
    ("gzip", r"is gzip-compressed, not a monitor.jsonl: decompress it first"),
    ("binary", r"line 1: not UTF-8"),
    ("records+binary", r"line 3: not UTF-8"),
    ("records+text", r"line 3: not JSON"),
    ("cr-only", r"line 1: not JSON"),
], ids=["gzip", "binary", "records+binary", "records+text", "cr-only"])
def test_an_unterminated_line_that_cannot_start_a_record_is_not_skipped_as_torn(tmp_path, content, match, recwarn):
    """Before the review a gzip file (no b"\\n" in it) read as [] with a 'torn line' warning, and a writer
    opened on it truncated it to 0 bytes."""
    lines = _records_of([_record(0, 1.0), _record(10, 2.0)])
    data = {"gzip": _gzip_of(lines), "binary": bytes(range(128, 256)),
            "records+binary": "".join(x + "\n" for x in lines).encode() + b"\x80\xff{",
            "records+text": "".join(x + "\n" for x in lines).encode() + b"not a record",
            "cr-only": "".join(x + "\r" for x in lines).encode()}[content]  # old Mac line ends: was read as []
    (tmp_path / "monitor.jsonl").write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_records(tmp_path / "monitor.jsonl")
    assert not [w for w in recwarn if "torn" in str(w.message)]
    with pytest.raises(ValueError, match=r"is not a monitor record file .* nothing was changed"):
        _writer(tmp_path)
    assert (tmp_path / "monitor.jsonl").read_bytes() == data


@pytest.mark.parametrize("ending", ["\r\n", "\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "bom"])
def test_crlf_and_a_byte_order_mark_read_as_the_same_records(tmp_path, ending, bom):
    history = [_record(0, 1.0), _record(10, NAN)]
    path = tmp_path / "monitor.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(x + ending for x in _records_of(history)).encode())
    assert _same(read_records(path), [{k: v for k, v in h.items()} for h in history])
    path.write_bytes(b"\n" if not bom else b"\xef\xbb\xbf\r\n")
    assert read_records(path) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_at_once_by_the_reader_and_the_writer(tmp_path):
    """A FIFO with no writer blocked read_records forever; the writer died on seek (a bare OSError)."""
    os.mkfifo(tmp_path / "monitor.jsonl")
    result = []

    def read():
        try:
            read_records(tmp_path / "monitor.jsonl")
        except ValueError as e:
            result.append(str(e))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # unblock the hung reader so the test process can end, then fail
        with open(os.open(tmp_path / "monitor.jsonl", os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("read_records blocked on a FIFO")
    assert result and "is not a regular file" in result[0]
    with pytest.raises(ValueError, match="is not a regular file"):
        _writer(tmp_path)
    assert os.path.exists(tmp_path / "monitor.jsonl") and not os.path.isfile(tmp_path / "monitor.jsonl")
    with pytest.raises(ValueError, match="is not a regular file"):
        read_records(os.devnull)


def test_a_loop_of_links_and_a_path_subclass(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OSError):
        read_records(tmp_path / "loop")

    class MyPath(type(tmp_path)):
        pass
    _write_lines(tmp_path / "m.jsonl", _records_of([_record(3, 1.0)]))
    assert [r["step"] for r in read_records(MyPath(tmp_path / "m.jsonl"))] == [3]


@pytest.mark.parametrize("tail", [b"\x00" * 64, b'{"step": 20, "qu' + b"\x00" * 7, b"\x00\x00{\"st", b"  "],
                         ids=["zeros", "record+zeros", "zeros+record", "blank"])
def test_a_zero_filled_or_blank_tail_is_what_a_crash_leaves(tmp_path, tail, caplog):
    """A power loss can leave the end of an appended file zero-filled: still a torn tail (skipped by the reader
    with a warning unless blank, dropped by the writer), never a corrupt file."""
    lines = _records_of([_record(0, 1.0), _record(10, 2.0)])
    head = "".join(x + "\n" for x in lines).encode()
    (tmp_path / "monitor.jsonl").write_bytes(head + tail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["step"] for r in read_records(tmp_path / "monitor.jsonl")] == [0, 10]
    assert len([w for w in caught if "is torn" in str(w.message)]) == (tail.strip() != b"")
    _writer(tmp_path).close()
    assert (tmp_path / "monitor.jsonl").read_bytes() == head
