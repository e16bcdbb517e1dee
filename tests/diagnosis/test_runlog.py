"""The run log loses nothing: a torn last line costs only itself, an existing log is never
truncated silently, a second writer is refused, a full disk is counted instead of raised, and
reading checks the format version and the type of every field."""

import contextlib
import dataclasses
import errno
import gc
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest

import curvscope as cs
from curvscope.diagnosis import (
    Evidence,
    LogFormatError,
    LogInUseError,
    LogWriteWarning,
    State,
    TornLogWarning,
)
from curvscope.diagnosis.runlog import RECORD_FIELDS, RunLogWriter, read_log
from tests import cases

HEADER = {"curvscope_log": 1, "version": "0.1.0", "every": 1}


def record(step, state="learning", **extra):
    return {"step": step, "state": state, "advice": ["a"], "reasons": ["r"], "loss": 1.0, **extra}


def write_lines(path, *objs, end="\n"):
    path.write_text("\n".join(json.dumps(o) for o in objs) + end, encoding="utf-8")


@pytest.fixture(scope="module")
def monitor_log(tmp_path_factory):
    """The bytes of a real Monitor log: a header and 5 probe records."""
    path = tmp_path_factory.mktemp("log") / "run.jsonl"
    case = cases.mlp()
    with cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, every=1, log=path) as mon:
        for _ in range(5):
            mon.step(1.0)
    return path.read_bytes()


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------ torn last line
def test_a_torn_last_line_costs_only_itself(monitor_log, tmp_path):
    """A writer killed mid-line leaves the last line without its newline: the 4 intact records
    come back, and the warning names the lost line (not the parser's "line 1")."""
    lines = monitor_log.split(b"\n")
    assert len(lines) == 7 and lines[-1] == b""  # header, 5 records, the final newline
    path = tmp_path / "run.jsonl"
    path.write_bytes(monitor_log[: -len(lines[-2]) // 2])  # half of the 5th record
    with pytest.warns(TornLogWarning) as caught:
        header, records = read_log(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "line 6, the last of run 0, was cut off mid-write" in message
    assert "returning the 4 intact records" in message and "\n" not in message
    assert header["curvscope_log"] == 1
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_a_line_cut_inside_a_character_is_torn_too(monitor_log, tmp_path):
    """A cut inside a multi-byte character (the ‖ of "‖g‖" in a record's reasons) made the whole
    file "not UTF-8 text": every record lost (an outside review). It is a torn line like any
    other; a bad byte anywhere before the last line is still refused."""
    start = monitor_log.rstrip(b"\n").rfind(b"\n") + 1
    cut = monitor_log.index("‖".encode(), start) + 1  # one byte of three
    path = tmp_path / "run.jsonl"
    path.write_bytes(monitor_log[:cut])
    with pytest.warns(TornLogWarning, match="line 6, the last of run 0"):
        _, records = read_log(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    path.write_bytes(monitor_log[:cut] + b"\n")
    with pytest.raises(LogFormatError, match="not UTF-8"):
        read_log(path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("loss", 10**400, "'loss' must be a number"),
        ("layer_shares", {"0.weight": 10**400}, "'layer_shares' must be an object of numbers"),
        ("step", 2**64, "'step' must be a non-negative integer"),
    ],
)
def test_numbers_beyond_float_or_int64_are_named(monitor_log, tmp_path, field, value, match):
    """A 401-digit loss or share raised OverflowError (a traceback from `curvscope report`), a
    step of 2⁶⁴ "ufunc 'isfinite' not supported" (an outside review)."""
    lines = monitor_log.decode().split("\n")
    record = json.loads(lines[2])
    record[field] = value
    lines[2] = json.dumps(record)
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(LogFormatError, match=match):
        read_log(path)


def test_a_damaged_line_elsewhere_is_an_error_that_names_it(monitor_log, tmp_path):
    path = tmp_path / "run.jsonl"
    lines = monitor_log.split(b"\n")
    lines[2] = lines[2][:40]  # line 3 of the file, followed by intact lines
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LogFormatError, match=r"run.jsonl, line 3, column \d+: not valid JSON"):
        read_log(path)
    # a last line that ends with its newline was not cut by a killed writer: damaged
    path.write_bytes(monitor_log[: -len(lines[-2]) // 2] + b"\n")
    with pytest.raises(LogFormatError, match=r"line 6, column \d+: not valid JSON"):
        read_log(path)


def test_appending_after_a_torn_line_keeps_both_runs(monitor_log, tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(monitor_log[:-100])
    with RunLogWriter(path, "a", HEADER) as log:
        log.write(record(7))
    with no_warnings():
        header, records = read_log(path)  # the new run: intact, no warning
    assert header["previous_run_cut"] is True and [r["step"] for r in records] == [7]
    with pytest.warns(TornLogWarning, match="line 6, the last of run 0"):
        _, records = read_log(path, run=0)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_appending_after_a_line_cut_inside_a_character_keeps_both_runs(monitor_log, tmp_path):
    """A writer killed inside a multi-byte character, its run resumed with log_mode="a": the
    resumed run's newline ends the cut line mid-file, and read_log (both runs) and `curvscope
    report` failed on the whole file as "not UTF-8 text" (an outside review)."""
    start = monitor_log.rstrip(b"\n").rfind(b"\n") + 1
    cut = monitor_log.index("‖".encode(), start) + 1  # one byte of three
    path = tmp_path / "run.jsonl"
    path.write_bytes(monitor_log[:cut])
    with RunLogWriter(path, "a", HEADER) as log:
        log.write(record(7))
    with no_warnings():
        header, records = read_log(path)
    assert header["previous_run_cut"] is True and [r["step"] for r in records] == [7]
    with pytest.warns(TornLogWarning, match="line 6, the last of run 0"):
        _, records = read_log(path, run=0)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_records_into_a_deleted_log_are_counted_lost(tmp_path):
    """A log deleted mid-run took the records into the unlinked file, records_lost 0, unsaid."""
    path = tmp_path / "run.jsonl"
    log = RunLogWriter(path, "x", HEADER)
    assert log.write(record(1))
    path.unlink()
    with pytest.warns(LogWriteWarning, match="deleted while the run wrote"):
        assert not log.write(record(2))
    assert log.lost == 1
    with pytest.warns(LogWriteWarning, match="1 of 2 probe records could not be written"):
        log.close()


def test_appending_after_a_header_cut_short_keeps_the_new_run(monitor_log, tmp_path):
    """A writer killed while writing its header, then resumed with log_mode="a": the new
    header says previous_run_cut, yet read_log (and `curvscope report`) failed on line 1, "not
    valid JSON", and the resumed run's intact records were unreadable (an outside review). The
    cut line is a run of its own, with nothing in it."""
    path = tmp_path / "run.jsonl"
    path.write_bytes(monitor_log[: monitor_log.index(b"\n") // 2])
    with RunLogWriter(path, "a", HEADER) as log:
        log.write(record(9))
        log.write(record(12))
    with no_warnings():
        header, records = read_log(path)
    assert header["previous_run_cut"] is True and [r["step"] for r in records] == [9, 12]
    with pytest.warns(TornLogWarning, match="line 1"):
        header, records = read_log(path, run=0)
    assert header == {} and records == []


# --------------------------------------------------------------------------------- runs
def test_runs_by_index(tmp_path):
    path = tmp_path / "run.jsonl"
    write_lines(path, HEADER, record(1), {**HEADER, "every": 2}, record(2), record(4))
    assert read_log(path) == ({**HEADER, "every": 2}, [record(2), record(4)])
    assert read_log(path, run=0) == (HEADER, [record(1)])
    assert read_log(path, run=-2) == read_log(path, run=0)
    with pytest.raises(ValueError, match=r"run=2 is out of range: .* holds 2 run\(s\)"):
        read_log(path, run=2)
    with pytest.raises(TypeError, match="run must be an integer index"):
        read_log(path, run="last")


def test_a_log_without_header_and_an_empty_file(tmp_path):
    path = tmp_path / "run.jsonl"
    write_lines(path, record(1), record(2))
    assert read_log(path) == ({}, [record(1), record(2)])
    path.write_text("")
    assert read_log(path) == ({}, [])


def test_a_run_is_not_appended_to_a_file_that_is_not_a_run_log(tmp_path):
    """log_mode='a' appended a header and probes to another tool's metrics file without a word,
    and then neither read_log nor the report could read that run: the whole file is refused at
    its first line (an outside review). Refused, the file untouched; a log whose header was
    cut short mid-write still takes a run, and so does /dev/null
    with log_mode='w' (it raised a bare "Invalid argument" from truncating it)."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, {"step": 1, "loss": 0.5, "acc": 0.9})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"not a curvscope run log .* log_mode='w'"):
        RunLogWriter(path, "a", HEADER)
    assert path.read_bytes() == before
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b'{"curvscope_l')  # a header cut short mid-write
    for step in (1, 2):  # (the second append was refused: the first bytes were checked)
        with RunLogWriter(cut, "a", HEADER) as log:
            log.write(record(step))
        assert read_log(cut)[1] == [record(step)]
    # what read_log reads takes a run: a blank first line, a header's keys in another order,
    # records before any header
    reordered = dict(reversed(list(HEADER.items())))  # "curvscope_log" last
    for start in ("\n" + json.dumps(HEADER), json.dumps(reordered), json.dumps(record(0))):
        kept = tmp_path / "kept.jsonl"
        kept.write_text(start + "\n")
        with RunLogWriter(kept, "a", HEADER) as log:
            log.write(record(3))
        assert read_log(kept)[1] == [record(3)]
    with RunLogWriter(os.devnull, "w", HEADER) as log:
        assert log.write(record(1))


def test_a_line_of_text_is_not_a_torn_run_log(tmp_path):
    """A one-line text file without a final newline was read as a Monitor's log killed
    mid-write: no records and a TornLogWarning, and the report said "no probe records yet"
    (an outside review). A first line that is not the start of a header is not a run log."""
    path = tmp_path / "hello.txt"
    for text, line in (("hello world", 1), ("\nhello world", 2)):
        path.write_text(text)
        with pytest.raises(LogFormatError, match=rf"line {line}: not valid JSON, and not the"):
            read_log(path)
    path.write_text('{"curvscope_log": 1, "ver')  # a header cut short: torn, its run empty
    with pytest.warns(TornLogWarning):
        assert read_log(path) == ({}, [])


def test_another_tools_metrics_are_not_a_run_log(tmp_path):
    """An outside review: a JSON-lines file of {"step", "loss", "acc"} records (no header, no
    state) was read as a run and reported empty, exit 0."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, {"step": 1, "loss": 0.5, "acc": 0.9}, {"step": 2, "loss": 0.4, "acc": 0.9})
    with pytest.raises(LogFormatError, match=r"line 1: a record with no 'state' .*step, loss, acc"):
        read_log(path)
    write_lines(path, HEADER, {"step": 1, "loss": 0.5})  # under a header: a run's record
    assert read_log(path) == (HEADER, [{"step": 1, "loss": 0.5}])


def test_non_finite_numbers_come_back_as_floats(tmp_path):
    path = tmp_path / "run.jsonl"
    with RunLogWriter(path, "x", HEADER) as log:
        log.write(record(1, loss=math.nan, sharpness=math.inf, layer_shares={"w": math.nan}))
    assert '"loss": "nan"' in path.read_text()  # JSON has no literal for them
    _, (r,) = read_log(path)
    assert math.isnan(r["loss"]) and r["sharpness"] == math.inf
    assert math.isnan(r["layer_shares"]["w"])


# ----------------------------------------------------------------------------- checking
@pytest.mark.parametrize(
    "lines,message",
    [
        (
            [{"curvscope_log": 2, "version": "9.0"}, record(1)],
            r"line 1: log format 2 \(written by curvscope 9.0\); this curvscope reads format 1 "
            r"and older: upgrade curvscope",
        ),
        ([{"curvscope_log": "1"}], r"line 1: 'curvscope_log' must be a positive integer"),
        ([HEADER, record(1, state="exploding")], r"line 2: 'state' must be one of learning, "),
        ([HEADER, record(1, cause="boredom")], r"'cause' must be one of cadence, loss, forecast, "),
        ([HEADER, record("<script>")], r"line 2: 'step' must be a non-negative integer, got "),
        ([HEADER, record(-1)], r"'step' must be a non-negative integer, got -1"),
        ([HEADER, record(1, advice="go slower")], r"'advice' must be a list of strings"),
        ([HEADER, record(1, loss="low")], r"'loss' must be a number, null or 'nan', got \"low\""),
        ([HEADER, record(1, matvecs=2.5)], r"'matvecs' must be a non-negative integer"),
        ([HEADER, record(1, confident="yes")], r"'confident' must be true or false"),
        ([HEADER, record(1, layer_shares={"w": "big"})], r"'layer_shares' must be an object of"),
        ([HEADER, [1, 2]], r"line 2: expected a JSON object, got list"),
    ],
)
def test_bad_fields_are_one_clear_error(tmp_path, lines, message):
    path = tmp_path / "run.jsonl"
    write_lines(path, *lines)
    with pytest.raises(LogFormatError, match=message) as e:
        read_log(path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_not_utf8_is_a_format_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"step": 1, "state": "learning"}\n\xff\xfe\n')
    with pytest.raises(LogFormatError, match=r"line 2, column 1: .*not UTF-8 text at byte 0"):
        read_log(path)


def test_unknown_fields_are_kept(tmp_path):
    path = tmp_path / "run.jsonl"
    write_lines(path, HEADER, record(1, note="warm restart", extra={"a": [1]}))
    _, (r,) = read_log(path)
    assert r["note"] == "warm restart" and r["extra"] == {"a": [1]}


def test_every_evidence_field_and_state_is_checked_on_reading(tmp_path):
    """The reader checks the type of every key a diagnosis writes, and knows every state."""
    unchecked = [f.name for f in dataclasses.fields(Evidence) if f.name not in RECORD_FIELDS]
    assert unchecked == ["extra"]  # the keys not produced by curvscope, kept as they are
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(record(i, state)) + "\n" for i, state in enumerate(State)))
    assert [r["state"] for r in read_log(path)[1]] == list(State)


# ------------------------------------------------------------------------------ writing
def test_modes_follow_open(tmp_path):
    path = tmp_path / "run.jsonl"
    with RunLogWriter(path, "x", HEADER) as log:
        log.write(record(1))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"already exists and log_mode='x' .* log_mode='a'"):
        RunLogWriter(path, "x", HEADER)
    assert path.read_bytes() == before  # refused: nothing lost
    with RunLogWriter(path, "a", HEADER) as log:
        log.write(record(2))
    assert read_log(path, run=0)[1] == [record(1)] and read_log(path)[1] == [record(2)]
    with RunLogWriter(path, "w", HEADER) as log:
        log.write(record(3))
    assert path.read_text().count("curvscope_log") == 1 and read_log(path)[1] == [record(3)]
    with pytest.raises(ValueError, match=r"log_mode must be 'x' .* got 'r\+'"):
        RunLogWriter(path, "r+", HEADER)
    for mode in "xaw":  # a folder: "already exists, pass log_mode='a'" was no fix
        with pytest.raises(IsADirectoryError, match=r"is a directory: .*run\.jsonl"):
            RunLogWriter(tmp_path, mode, HEADER)
    with pytest.raises(ValueError, match=r"an empty path '': .*log='run\.jsonl'"):
        RunLogWriter("", "x", HEADER)  # Path("") is ".": it said "a directory" (a review)


def test_a_second_writer_is_refused_and_destroys_nothing(tmp_path):
    path = tmp_path / "run.jsonl"
    first = RunLogWriter(path, "x", HEADER)
    first.write(record(1))
    for mode in ("a", "w"):
        with pytest.raises(LogInUseError, match="being written by another Monitor"):
            RunLogWriter(path, mode, HEADER)
    first.write(record(2))
    first.close()
    assert read_log(path) == (HEADER, [record(1), record(2)])  # "w" truncated nothing
    with RunLogWriter(path, "a", HEADER):  # the lock went with close()
        pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker forked while a Monitor's log is open inherited the locked file: a
    new Monitor on the path was refused after the first closed, while the worker lived."""
    path = tmp_path / "run.jsonl"
    first = RunLogWriter(path, "x", HEADER)
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child outlives the parent's close(), like a persistent worker
        os.write(ready_write, b"r")  # the fork hooks have run by now
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.read(ready_read, 1)  # as a DataLoader worker would be: started well before the close
    try:
        first.close()
        with RunLogWriter(path, "a", HEADER):
            pass
    finally:
        os.write(write_end, b"x")
        for fd in (write_end, ready_read, ready_write):
            os.close(fd)
        os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_writer_dropped_without_close_leaves_later_forks_alone(tmp_path):
    """The locked logs were kept as descriptor numbers, discarded only by close(): a Monitor
    garbage-collected instead left its number, the next open() reused it, and every later
    fork pointed that unrelated file at /dev/null — a forked child's writes to it vanished and
    a fork Pool hung (an outside review). A child now writes to it as to any file."""
    writer = RunLogWriter(tmp_path / "run.jsonl", "x", HEADER)
    del writer
    gc.collect()
    mine = os.open(tmp_path / "mine.txt", os.O_WRONLY | os.O_CREAT)
    pid = os.fork()
    if pid == 0:
        os.write(mine, b"from the child")
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(mine)
    assert (tmp_path / "mine.txt").read_bytes() == b"from the child"


def test_a_log_in_a_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot be created.*os.makedirs.*log=None"):
        RunLogWriter(tmp_path / "no" / "run.jsonl", "x", HEADER)


CHILD = """
import sys, time, torch, curvscope as cs
model = torch.nn.Linear(2, 1)
data = (torch.randn(4, 2), torch.randn(4, 1))
mon = cs.Monitor(model, torch.nn.functional.mse_loss, data, lr=0.1, log=sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX")
def test_the_lock_holds_across_processes_and_dies_with_its_process(tmp_path):
    path = tmp_path / "run.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(LogInUseError):
            RunLogWriter(path, "a", HEADER)
    finally:
        child.kill()  # SIGKILL: no close(), no cleanup
        child.wait(timeout=30)
    with RunLogWriter(path, "a", HEADER):
        pass


def test_disk_full_is_counted_not_raised(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = RunLogWriter("/dev/full", "a", HEADER)
        results = [log.write(record(i)) for i in range(3)]
        assert log.lost == 3 and results == [False] * 3
        assert len(caught) == 1  # once, at the first failure
        log.close()
    assert [w.category for w in caught] == [LogWriteWarning] * 2
    assert "No space left on device" in str(caught[0].message)
    assert "3 of 3 probe records could not be written" in str(caught[1].message)


class FillingDisk(io.StringIO):
    """A text file whose writes fail with ENOSPC while ``full`` is set."""

    full = False

    def write(self, s):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)


def test_records_after_a_loss_carry_the_count_and_a_lost_header_is_retried():
    f = FillingDisk()
    f.full = True
    with pytest.warns(LogWriteWarning, match="could not write to the run log"):
        log = RunLogWriter(f, "x", HEADER)
    assert not log.write(record(1))
    f.full = False
    assert log.write(record(2)) and log.write(record(3))
    with pytest.warns(LogWriteWarning, match="1 of 3 probe records"):
        log.close()
    lines = [json.loads(x) for x in f.getvalue().splitlines()]
    assert lines == [HEADER, {**record(2), "records_lost": 1}, {**record(3), "records_lost": 1}]


GROWTH_CHILD = """
import json, os, resource, signal, sys, warnings
import torch, curvscope as cs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
data = (torch.randn(16, 3), torch.randn(16, 1))
path = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mon = cs.Monitor(model, torch.nn.functional.mse_loss, data, lr=0.1, every=1, log=path)
    header = os.path.getsize(path)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (header + 100, hard))  # 100 bytes still fit
    mon.step(1.0)
    after_first = os.path.getsize(path)
    mon.step(1.0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
    mon.step(1.0)
    mon.step(1.0)
    lost = mon.records_lost
    mon.close()
print(json.dumps({"header": header, "after_first": after_first, "lost": lost,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
def test_a_write_cut_short_by_the_filesystem_leaves_whole_lines(tmp_path):
    """A real short write: the OS takes 100 bytes of a record, then refuses the rest. The
    partial line is cut off again, training goes on, and the log reads back whole."""
    path = tmp_path / "run.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(GROWTH_CHILD), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["after_first"] == res["header"]  # the 100 bytes written were cut off again
    assert res["lost"] == 2
    kinds = [w[0] for w in res["warnings"]]
    assert kinds == ["LogWriteWarning", "LogWriteWarning"], res["warnings"]
    assert "File too large" in res["warnings"][0][1] and "2 of 4" in res["warnings"][1][1]
    with no_warnings():
        header, records = read_log(path)
    assert header["curvscope_log"] == 1
    assert [(r["step"], r["records_lost"]) for r in records] == [(3, 2), (4, 2)]
