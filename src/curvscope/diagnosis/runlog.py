"""The JSONL run log: writing it so that nothing is lost, and reading it back, checked.

The format (version :data:`LOG_VERSION`): one JSON object a line. A run starts with a header
line holding ``"curvscope_log": <version>``; each probe then adds one record with ``"step"``,
``"state"``, ``"advice"``, ``"reasons"`` and the evidence keys at top level. Non-finite
numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no literal for
them) and read back as floats. A file may hold several runs (``log_mode="a"`` appends one).

Writing (:class:`RunLogWriter`):

- a path is opened following :func:`open`'s convention: ``"x"`` (the default) refuses an
  existing file, ``"a"`` appends a new run with its own header, ``"w"`` overwrites;
- the writer holds an exclusive lock on the file (``fcntl.flock``) from open to close, so a
  second writer is refused instead of interleaving records; the operating system drops the
  lock when the process dies. Where ``fcntl`` does not exist (Windows) no lock is taken:
  do not point two Monitors at one path there;
- each line goes to the operating system in one ``write`` as it is made (a killed process
  loses at most the line being written, which then lacks its newline: :func:`read_log`
  returns the records before it and warns). A power cut may still lose what the OS had not
  yet put on disk (no ``fsync``: it would cost milliseconds a probe);
- a write that fails (disk full, ``ENOSPC``; over a file size limit, ``EFBIG``) never
  reaches the training loop: the part of the line already written is cut off again (the file
  holds whole lines only), a :class:`LogWriteWarning` is issued once, the lost records are
  counted, every record written after a loss carries ``"records_lost"`` (the count so far),
  and closing warns with the total. A header that could not be written is retried before the
  next record, so a run never loses its header.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import stat
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from curvscope.diagnosis.classify import STATES

try:  # POSIX; absent on Windows, where no lock is taken (see the module docstring)
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

#: Version of the run-log format (the header line's ``"curvscope_log"``).
LOG_VERSION = 1
#: The ways to open a log path, as for :func:`open`.
LOG_MODES = ("x", "a", "w")


class LogFormatError(ValueError):
    """A file is not a run log this version of curvscope can read; the message is one line
    that names the file, the line and what is wrong."""


class LogInUseError(RuntimeError):
    """Another writer (a Monitor in this or another process) holds the run log's lock."""


class TornLogWarning(UserWarning):
    """The last line of a run was cut off mid-write; the intact records were returned."""


class LogWriteWarning(RuntimeWarning):
    """A write to the run log failed (disk full); training goes on, the records are counted."""


def jsonable(x: Any) -> Any:
    """``x`` with its non-finite floats as the strings "nan", "inf", "-inf" (JSON has no
    literal for them: Python's ``json`` writes ``NaN``/``Infinity``, which other readers
    refuse) and tensors as lists — for the run log and the command line's ``--json``."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "nan", "inf", "-inf": JSON has no literal for them
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return jsonable(x.tolist())
    return x


def _line(record: dict[str, Any]) -> bytes:
    # allow_nan=False: whatever jsonable missed is an error here, never invalid JSON on disk
    return (json.dumps(jsonable(record), ensure_ascii=False, allow_nan=False) + "\n").encode()


# ------------------------------------------------------------------------------- writing
class RunLogWriter:
    """Writes one run (a header, then records) to a path or to an open text file.

    Args:
        target: a path, or an open text file (written and flushed as it is; the caller opened
            it, so the caller closes it, and it gets no lock).
        mode: for a path: ``"x"`` (refuse an existing file), ``"a"`` (append a new run) or
            ``"w"`` (overwrite).
        header: the run's first line.

    Raises:
        ValueError: an unknown ``mode``.
        FileExistsError: ``mode="x"`` and the file exists (the message names the options).
        LogInUseError: another writer holds the file's lock.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str], mode: str, header: dict) -> None:
        check_log_mode(mode)
        self.name = str(getattr(target, "name", target))
        self.lost = 0  # probe records that could not be written
        self.written = 0  # probe records written
        self._warned = False
        self._first_error: OSError | None = None
        self._raw: io.FileIO | None = None
        self._text: IO[str] | None = None
        if hasattr(target, "write"):
            self._text = target  # type: ignore[assignment]
        else:
            if not os.fspath(target).strip():  # Path("") is ".": "is a directory" (a review)
                raise ValueError(
                    f"the run log is an empty path {os.fspath(target)!r}: pass the path of a "
                    "file, e.g. log='run.jsonl', or log=None for no log"
                )
            self._raw = _open_locked(Path(target), mode)
            if mode == "a" and not _first_line_is_a_header(self._raw):
                self._raw.close()
                raise ValueError(
                    f"log_mode='a' appends a run to {self.name!r}, which is not a curvscope run "
                    "log (its first line is not a run's header): the run would be written where "
                    "no reader reaches it (cs.read_log refuses the whole file). Pass another "
                    "path, or log_mode='w' to overwrite it"
                )
            if mode == "a" and not _ends_with_newline(self._raw):
                # a previous writer was killed mid-line: end that line, and say so in the
                # header, so that read_log knows the line before it was cut, not corrupt
                self._raw.write(b"\n")
                header = {**header, "previous_run_cut": True}
        self._header: dict | None = header
        self._write_header()

    @property
    def closed(self) -> bool:
        return self._raw is None and self._text is None

    def write(self, record: dict[str, Any]) -> bool:
        """Append one probe record; True if it reached the file. Never raises ``OSError``."""
        if self.closed:
            raise ValueError(f"the run log {self.name!r} is closed")
        if (self._header is None or self._write_header()) and self._put(
            _line({**record, "records_lost": self.lost} if self.lost else record)
        ):
            self.written += 1
            return True
        self.lost += 1
        return False

    def close(self) -> None:
        """Close the file (releasing the lock) if this writer opened it; warn if records were
        lost. Idempotent."""
        if self.closed:
            return
        if self._raw is not None:
            _LOCKED.discard(self._raw)
            self._raw.close()  # closing the descriptor releases the flock
        self._raw = self._text = None
        if self.lost:
            warnings.warn(
                f"{self.lost} of {self.lost + self.written} probe records could not be written "
                f"to the run log {self.name!r} ({self._first_error}); the records written after "
                "the first loss carry 'records_lost'",
                LogWriteWarning,
                stacklevel=3,
            )

    def __enter__(self) -> RunLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ internals
    def _write_header(self) -> bool:
        assert self._header is not None
        if self._put(_line(self._header)):
            self._header = None
            return True
        return False

    def _put(self, data: bytes) -> bool:
        """Write whole lines or nothing: on a failure, cut off what part of it was written."""
        try:
            if self._text is not None:
                self._text.write(data.decode())
                self._text.flush()
                return True
            assert self._raw is not None
            info = os.fstat(self._raw.fileno())
            if not info.st_nlink:  # records into a deleted file reach no reader: lost, said
                raise FileNotFoundError(  # (they went there unsaid, records_lost 0: a review)
                    errno.ENOENT, "the file was deleted while the run wrote to it", self.name
                )
            start = info.st_size
            view = memoryview(data)
            try:
                while view:
                    n = self._raw.write(view)
                    if not n:  # pragma: no cover - a raw file in blocking mode never gives 0
                        raise OSError(f"the file took no bytes of a {len(data)}-byte record")
                    view = view[n:]
            except OSError:
                # the file holds whole lines only (/dev/full cannot be truncated: it kept nothing)
                with contextlib.suppress(OSError):
                    os.ftruncate(self._raw.fileno(), start)
                raise
            return True
        except OSError as e:
            if self._first_error is None:
                self._first_error = e
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"could not write to the run log {self.name!r}: {e}. Training goes on; the "
                    "records lost are counted (Monitor.records_lost, and 'records_lost' in the "
                    "records written after), and closing the Monitor reports the total",
                    LogWriteWarning,
                    stacklevel=4,
                )
            return False


def check_log_mode(mode: object) -> None:
    if mode not in LOG_MODES:
        raise ValueError(
            "log_mode must be 'x' (a new file: refuse an existing one), 'a' (append a new run "
            f"to an existing file) or 'w' (overwrite it), as for open(); got {mode!r}"
        )


#: the open log files this process holds locked: a forked child (a DataLoader worker) inherits
#: their descriptors, and with them the lock, which would outlive the writer's close(). Weak:
#: a writer dropped without close() (a Monitor garbage-collected) leaves with its file — a set
#: of descriptor numbers kept the number, which the next open() reused, and every later fork
#: pointed that unrelated file or pipe at /dev/null (a Pool hung: an outside review)
_LOCKED: weakref.WeakSet[io.FileIO] = weakref.WeakSet()


def _release_in_child() -> None:
    """After a fork, point the child's copies of the locked descriptors at /dev/null: the
    lock belongs to the open file, so the child's copy would keep it held after the parent
    closes (a new Monitor on the path would be refused while a persistent worker lives). The
    descriptor numbers stay valid, so nothing in the child closes an unrelated file later."""
    held = [raw.fileno() for raw in list(_LOCKED) if not raw.closed]
    _LOCKED.clear()
    if not held:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in held:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_in_child)


def _open_locked(path: Path, mode: str) -> io.FileIO:
    # O_APPEND: every write lands at the end; never O_TRUNC here: "w" truncates only once it
    # holds the lock, so that a refused second writer destroys nothing
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | (os.O_EXCL if mode == "x" else 0)
    if path.is_dir():  # the advice below (another log_mode) would not help
        raise IsADirectoryError(
            f"the run log {str(path)!r} is a directory: pass the path of a file, e.g. "
            f"log={str(path / 'run.jsonl')!r}"
        )
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError:
        raise FileExistsError(
            f"the run log {str(path)!r} already exists and log_mode='x' (the default) never "
            "overwrites: pass log_mode='a' to append a new run to it (cs.read_log reads the last "
            "run by default), log_mode='w' to overwrite it, or choose another path"
        ) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise type(e)(
            f"the run log {str(path)!r} cannot be created ({e.strerror}): pass a path in a "
            "folder that exists and this process may write (log='runs/run.jsonl' after "
            "os.makedirs('runs', exist_ok=True)), or log=None for no log"
        ) from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise OSError(
            e.errno,
            f"the run log {str(path)!r} is on a read-only file system: pass a path on a "
            "writable one, or log=None for no log",
        ) from None
    raw = io.FileIO(fd, "r+", closefd=True)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raw.close()
            raise LogInUseError(
                f"the run log {str(path)!r} is being written by another Monitor (in this or "
                "another process: it holds the file's lock); two writers would interleave their "
                "records. Give each Monitor its own log path, or close the other one first "
                "(mon.close(); a curvscope callback's: callback.monitor.close())"
            ) from None
        _LOCKED.add(raw)
    if mode == "w" and stat.S_ISREG(os.fstat(fd).st_mode):  # (/dev/null cannot be truncated)
        os.ftruncate(fd, 0)
    return raw


#: How every header a Monitor writes begins (its first key: the format's version).
HEADER_START = '{"curvscope_log":'


def starts_as_header(line: str) -> bool:
    """Whether a line that is not valid JSON is the start of a run's header, cut off
    mid-write."""
    text = line.strip()
    return text.startswith(HEADER_START) or HEADER_START.startswith(text)


#: How much of a file's start is read for its first line (a header is well under 1 KiB).
FIRST_LINE_BYTES = 1 << 16


def _first_line_is_a_header(raw: io.FileIO) -> bool:
    """Whether a file to append a run to has no line but blank ones, or a first line as a run
    log's (a metrics file of another tool took a run that no reader could reach then: a review)."""
    if os.fstat(raw.fileno()).st_size == 0:
        return True
    try:
        raw.seek(0)
        start = raw.read(FIRST_LINE_BYTES) or b""
    except OSError:  # pragma: no cover - not a seekable file (a pipe): nothing to read back
        return True
    lines = [line for line in start.split(b"\n") if line.strip()]
    if not lines:
        return True
    first = lines[0].decode("utf-8", errors="replace")
    try:
        obj = json.loads(first)
    except ValueError:
        return starts_as_header(first)  # a header cut short
    # a header (its keys in any order), or a run's records before any header: read_log's too
    return isinstance(obj, dict) and ("curvscope_log" in obj or "state" in obj)


def _ends_with_newline(raw: io.FileIO) -> bool:
    size = os.fstat(raw.fileno()).st_size
    if size == 0:
        return True
    try:  # (seek + read, not os.pread, which Windows lacks; writes go to the end anyway)
        raw.seek(size - 1)
        return raw.read(1) == b"\n"
    except OSError:  # pragma: no cover - not a seekable file (a pipe)
        return True


# ------------------------------------------------------------------------------- reading
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _is_int(v: Any) -> bool:
    """An integer a count or a step can be (int64: numpy's, which the plots use; a step of
    2⁶⁴ gave "ufunc 'isfinite' not supported")."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_number(v: Any) -> bool:
    """A float, or an integer a float can hold (a 401-digit loss raised OverflowError)."""
    if isinstance(v, float):
        return True
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= sys.float_info.max


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _number_map(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_number(x) or x in _NONFINITE for x in v.values())


def _update_rows(v: Any) -> bool:
    def value(x: Any) -> bool:
        return x is None or _is_number(x) or x in _NONFINITE

    return isinstance(v, list) and all(
        isinstance(x, list) and len(x) in (2, 3) and _is_int(x[0]) and all(map(value, x[1:]))
        for x in v
    )


#: Why a Monitor probed (a record's ``"cause"``): its cadence, a training loss that ran away
#: (not finite, or above EXPLOSION times the first), its forecast, the cheap tier's alarm, or
#: :meth:`Monitor.probe` called by hand.
PROBE_CAUSES = ("cadence", "loss", "forecast", "check", "manual")
_NUMBER = (_optional(lambda v: _is_number(v) or v in _NONFINITE), "a number, null or 'nan'")
# the fields a reader relies on, and the type each must have where present
RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "state": (lambda v: v in STATES, "one of " + ", ".join(STATES)),
    "cause": (lambda v: v in PROBE_CAUSES, "one of " + ", ".join(PROBE_CAUSES)),
    "advice": (_str_list, "a list of strings"),
    "reasons": (_str_list, "a list of strings"),
    "zero_gradient_blocks": (_str_list, "a list of strings"),
    "dead_blocks": (_str_list, "a list of strings"),
    "zero_factor_blocks": (_str_list, "a list of strings"),
    "confident": (lambda v: isinstance(v, bool), "true or false"),
    "optimizer": (lambda v: isinstance(v, str), "a string"),
    "thresholds": (lambda v: isinstance(v, dict), "an object"),
    "layer_shares": (_number_map, "an object of numbers"),
    "group_lrs": (
        _optional(lambda v: isinstance(v, list) and all(map(_is_number, v))),
        "a list of numbers or null",
    ),
    "updates": (_update_rows, "a list of [step, curvature, top curvature] lists"),
    "matvecs": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "batches": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "clip_norms": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "unscaled_coordinates": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "records_lost": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "preconditioned": (lambda v: isinstance(v, bool), "true or false"),
    "eigen_converged": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    "decrement_converged": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    **dict.fromkeys(
        (
            "loss",
            "grad_norm",
            "sharpness",
            "lambda_min",
            "stability_limit",
            "directional_curvature",
            "newton_decrement",
            "lr",
            "limit_constant",
            "sharpness_residual",
            "lambda_min_residual",
            "grad_dot_step",
            "batch_sharpness",
            "batch_sharpness_stderr",
            "update_curvature",
            "stable_lr",
            "step_share",
            "clip_factor",
            "seconds",
            "zero_gradient_share",
            "dead_share",
            "chance_loss",
            "damped_decrement",
            "decrement_damping",
        ),
        _NUMBER,
    ),
}
HEADER_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "curvscope_log": (lambda v: _is_int(v) and v >= 1, "a positive integer (the format)"),
    "version": (lambda v: isinstance(v, str), "a string"),
    "started": (lambda v: isinstance(v, str), "a string"),
    "optimizer": (lambda v: isinstance(v, str), "a string"),
    "every": (lambda v: (_is_int(v) and v >= 1) or isinstance(v, str), "an integer or a string"),
    "budget": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "thresholds": (lambda v: isinstance(v, dict), "an object"),
    "previous_run_cut": (lambda v: isinstance(v, bool), "true or false"),
    "max_grad_norm": _NUMBER,
}


def _check(
    obj: dict[str, Any], fields: dict[str, tuple[Callable[[Any], bool], str]], where: str
) -> None:
    for key, (ok, expected) in fields.items():
        if key in obj and not ok(obj[key]):
            value = json.dumps(obj[key], ensure_ascii=False)
            value = value if len(value) <= 40 else value[:37] + "..."
            raise LogFormatError(f"{where}: {key!r} must be {expected}, got {value}")


#: The fields whose strings are text (a state, a sentence, a block's name), never a number's
#: marker: a layer named "inf" stays a name.
TEXT_FIELDS = frozenset(
    (
        "state",
        "cause",
        "optimizer",
        "advice",
        "reasons",
        "zero_gradient_blocks",
        "dead_blocks",
        "zero_factor_blocks",
        "version",
        "started",
        "every",
    )
)


def _decoded(v: Any) -> Any:
    """``v`` with every "nan", "inf", "-inf" in it, at any depth, as the float it stands for:
    :func:`jsonable` writes them so wherever a float is — inside ``updates`` rows and nested
    ``thresholds`` too, which came back as strings (an outside review). Keys stay as they are."""
    if isinstance(v, str):
        return _NONFINITE.get(v, v)
    if isinstance(v, list):
        return [_decoded(x) for x in v]
    if isinstance(v, dict):
        return {k: _decoded(x) for k, x in v.items()}
    return v


def _restore_nonfinite(obj: dict[str, Any]) -> dict[str, Any]:
    """A header or record with its non-finite numbers as floats (:func:`_decoded`), but for
    the :data:`TEXT_FIELDS`."""
    return {k: v if k in TEXT_FIELDS else _decoded(v) for k, v in obj.items()}


class Run:
    """One run of a log (:func:`read_runs`): its ``header`` (``{}`` for lines before any
    header), its ``records``, and ``cut_line``, the line a killed writer cut off at its end
    (None: none)."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header
        self.records: list[dict[str, Any]] = []
        self.cut_line: int | None = None  # the line a killed writer cut off, if any

    def torn_message(self, name: str, index: int) -> str | None:
        """What :class:`TornLogWarning` says of this run (run ``index`` of the file ``name``),
        or None when no line of it was cut."""
        if self.cut_line is None:
            return None
        n = len(self.records)
        return (
            f"{name}: line {self.cut_line}, the last of run {index}, was cut off mid-write "
            f"(the writing process was probably killed); returning the {n} intact "
            f"record{'' if n == 1 else 's'} before it"
        )


def _utf8(line: bytes) -> str:
    """A line's text, or a JSONDecodeError saying where it is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        text = line.decode("utf-8", errors="replace")
        raise json.JSONDecodeError(f"not UTF-8 text at byte {e.start}", text, e.start) from None


class _Parser:
    """Splits a log's lines into runs, checking each. A line that is not valid JSON is held
    back until the next line says what it was: the cut-off last line of a run (the next run's
    header says ``previous_run_cut``, or it was the file's last line and lacks its newline) or
    damage (anything else raises)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs: list[Run] = []
        self.bad: tuple[int, json.JSONDecodeError] | None = None  # a line that did not parse

    def fail(self) -> LogFormatError:
        assert self.bad is not None
        lineno, e = self.bad
        return LogFormatError(
            f"{self.name}, line {lineno}, column {e.colno}: not valid JSON ({e.msg}); a run log "
            "holds one JSON object a line"
        )

    def feed(self, lineno: int, line: bytes) -> None:
        try:
            # a line that is not UTF-8 (cut inside a character) is held like one that is not
            # JSON: torn if the next line says its run was cut, else damage
            obj = json.loads(_utf8(line))
        except json.JSONDecodeError as e:
            if self.bad is not None:
                raise self.fail() from None
            self.bad = (lineno, e)
            return
        where = f"{self.name}, line {lineno}"
        if not isinstance(obj, dict):
            raise LogFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "curvscope_log" in obj:
            self._header(obj, where)
        else:
            self._record(obj, where)

    def _header(self, obj: dict[str, Any], where: str) -> None:
        _check(obj, HEADER_FIELDS, where)
        version = obj["curvscope_log"]
        if version > LOG_VERSION:
            by = f" (written by curvscope {obj['version']})" if "version" in obj else ""
            raise LogFormatError(
                f"{where}: log format {version}{by}; this curvscope reads format "
                f"{LOG_VERSION} and older: upgrade curvscope to read it"
            )
        if self.bad is not None:
            if not obj.get("previous_run_cut"):
                raise self.fail() from None
            # the previous run's last line — its header, when the writer was killed while
            # writing that (the resumed run's records were unreadable then): a run of its own
            self._current().cut_line, self.bad = self.bad[0], None
        self.runs.append(Run(_restore_nonfinite(obj)))

    def _record(self, obj: dict[str, Any], where: str) -> None:
        if self.bad is not None:
            raise self.fail() from None
        _check(obj, RECORD_FIELDS, where)
        if not self.runs and "state" not in obj:
            # no header before it and no verdict in it: another tool's metrics (a file of
            # {"step", "loss", "acc"} lines was read as a run and reported empty: a review)
            fields = ", ".join(map(str, list(obj)[:6]))
            raise LogFormatError(
                f"{where}: a record with no 'state' and no curvscope header before it (its "
                f"fields: {fields}): not a run log a Monitor wrote"
            )
        self._current().records.append(_restore_nonfinite(obj))

    def _current(self) -> Run:
        if not self.runs:  # lines before any header (or an empty file) form a run of their own
            self.runs.append(Run({}))
        return self.runs[-1]

    def finish(self, complete: bool, last: int) -> list[Run]:
        """The runs, once the last line (number ``last``) has been fed; ``complete``: whether
        the file ends with a newline."""
        if self.bad is not None:
            if complete or self.bad[0] != last:
                raise self.fail() from None
            lineno, e = self.bad
            if not self.runs and not starts_as_header(e.doc):  # a file of one line of text
                raise LogFormatError(
                    f"{self.name}, line {lineno}: not valid JSON, and not the start of a run's "
                    "header "
                    '(a run log begins with {"curvscope_log": ...}): not a run log a Monitor '
                    "wrote"
                )
            self._current().cut_line = lineno  # the writer was killed before the newline
        self._current()
        return self.runs


def read_log(
    path: str | os.PathLike[str], *, run: int = -1
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a run log written by :class:`~curvscope.Monitor`: ``(header, records)``.

    A file holds one run per header line (``log_mode="a"`` appends runs); ``run`` picks one
    by index like a list: the last by default, ``0`` the first. Lines written before the first
    header (a log without one) form a run with the header ``{}``. Non-finite numbers come back
    as floats, at any depth (``updates`` rows, nested ``thresholds``); the strings of the text
    fields (``state``, ``advice``, block names ...: :data:`TEXT_FIELDS`) stay strings. The
    whole file is checked: the format version, and the type of every field a reader relies on
    (``step`` an integer, ``state`` a known state, ``advice`` a list of strings, the evidence
    numbers ...); unknown fields are kept as they are.

    A line cut off mid-write (a killed writer leaves the last line without its newline) is
    not an error: the intact records before it are returned and a :class:`TornLogWarning`
    says which line was lost. Any other damage raises.

    Raises:
        LogFormatError: the file is not a run log this version reads (the one-line message
            names the file, the line and the problem).
        ValueError: ``run`` is out of range (the message says how many runs there are).
        TypeError: ``run`` is not an integer.
        OSError: the file cannot be read (e.g. ``FileNotFoundError``).

    Example:
        >>> import curvscope as cs, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.jsonl"
        >>> _ = path.write_text('{"curvscope_log": 1}\\n{"step": 5, "state": "learning"}\\n')
        >>> cs.read_log(path)
        ({'curvscope_log': 1}, [{'step': 5, 'state': 'learning'}])
    """
    if not _is_int(run):
        raise TypeError(f"run must be an integer index (-1: the last run), got {run!r}")
    name = str(path)
    runs = read_runs(path)
    if not -len(runs) <= run < len(runs):
        raise ValueError(
            f"run={run} is out of range: {name} holds {len(runs)} run(s), "
            f"indices 0 to {len(runs) - 1} (or -1 for the last)"
        )
    chosen = runs[run]
    torn = chosen.torn_message(name, run % len(runs))
    if torn is not None:
        warnings.warn(torn, TornLogWarning, stacklevel=2)
    return chosen.header, chosen.records


def count_runs(path: str | os.PathLike[str]) -> int:
    r"""How many runs a run log holds (one per header line: ``log_mode="a"`` appends them), for
    :func:`read_log`'s ``run``; raises what :func:`read_log` raises for a file that is not one.

    Example:
        >>> import pathlib, tempfile, curvscope as cs
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.jsonl"
        >>> _ = path.write_text('{"curvscope_log": 1}\n{"step": 5}\n{"curvscope_log": 1}\n')
        >>> cs.diagnosis.runlog.count_runs(path)
        2
    """
    return len(read_runs(path))


def read_runs(path: str | os.PathLike[str]) -> list[Run]:
    """Every run of a log file, parsed and checked once (:func:`read_log` picks one of them and
    warns of its cut line; ``curvscope report`` reads a file once through this). Raises what
    :func:`read_log` raises for a file that is not a run log."""
    name = str(path)
    raw = Path(path).read_bytes()
    # line by line: a line cut inside a character (a killed writer; its run resumed after it,
    # the cut line ended by the resumed run's newline) is torn like a line cut anywhere else —
    # decoding the whole file made every run in it "not UTF-8 text" (an outside review)
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")  # else the last line lacks its newline
    if complete:
        lines.pop()
    parser = _Parser(name)
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            parser.feed(lineno, line)
    return parser.finish(complete, len(lines))
