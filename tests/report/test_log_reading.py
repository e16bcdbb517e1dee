"""The run log as a report reads it: every number the writer wrote as "nan", "inf" or "-inf"
comes back a float, wherever it was (an outside review of the command line)."""

import math

import curvscope as cs
from curvscope.diagnosis.runlog import RunLogWriter, read_runs


def test_non_finite_numbers_come_back_as_floats_at_any_depth(tmp_path):
    """`updates` rows and nested `thresholds` came back holding the strings "nan" and "inf",
    though read_log says non-finite numbers come back as floats: only top-level fields and
    `layer_shares` were decoded. The strings of text fields stay strings."""
    nan, inf = math.nan, math.inf
    path = tmp_path / "run.jsonl"
    with RunLogWriter(path, "x", {"curvscope_log": 1, "thresholds": {"margin": inf}}) as log:
        log.write(
            {
                "step": 5,
                "state": "learning",
                "loss": nan,
                "updates": [[3, nan, inf], [4, 1.0, None], [5, -inf, 2.0]],
                "thresholds": {"margin": inf, "nested": {"floors": [-inf, 0.5]}},
                "layer_shares": {"nan": nan, "0.weight": 1.0},
                "advice": ["inf"],
                "reasons": ["nan"],
                "zero_gradient_blocks": ["inf", "-inf"],
                "optimizer": "nan",
            }
        )
    assert '"updates": [[3, "nan", "inf"]' in path.read_text()  # what the writer writes
    header, (record,) = cs.read_log(path)
    assert header["thresholds"] == {"margin": inf}
    (_, u1, c1), row2, (_, u3, c3) = record["updates"]
    assert math.isnan(u1) and c1 == inf and row2 == [4, 1.0, None] and (u3, c3) == (-inf, 2.0)
    assert record["thresholds"]["margin"] == inf
    assert record["thresholds"]["nested"] == {"floors": [-inf, 0.5]}
    assert math.isnan(record["loss"]) and math.isnan(record["layer_shares"]["nan"])
    assert list(record["layer_shares"]) == ["nan", "0.weight"]  # a name, not a number
    assert (record["advice"], record["reasons"]) == (["inf"], ["nan"])
    assert record["zero_gradient_blocks"] == ["inf", "-inf"] and record["optimizer"] == "nan"
    assert read_runs(path)[0].records[0]["updates"][0][2] == inf  # the report's reader too
