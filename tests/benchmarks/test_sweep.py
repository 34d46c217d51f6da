"""The sweeps' shared helpers: flag parsing, statistics, atomic result files."""

import argparse
import json

import pytest

from benchmarks.sweep import mean_std, parse_list, run_jobs, write_json


@pytest.mark.parametrize("text", ["0.5,x", "0,1", "-1"])
def test_parse_list_refuses_bad_values_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit) as e:
        parse_list(argparse.ArgumentParser(prog="p"), "--taus", text)
    assert e.value.code == 2 and "--taus" in capsys.readouterr().err


def test_parse_list_mean_std_run_jobs_write_json(tmp_path):
    assert parse_list(argparse.ArgumentParser(), "--seeds", "0,2", int, positive=False) == [0, 2]
    assert mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and mean_std([]) == (None, None)
    assert run_jobs(lambda a, b: a * b, [(2, 3), (4, 5), (1, 1)], 2) == [6, 20, 1]  # in job order
    write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and not list(tmp_path.glob("*.tmp"))
