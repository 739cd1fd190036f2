"""The daemon's log lines: text, logfmt or JSON on stderr, with syslog priority prefixes when
stderr is journald's stream.

- `text`: `LEVEL logger message` (what a terminal reads);
- `logfmt`: `level=warning logger=edge_agent.link msg="…"`, every value quoted where it
  needs to be, so logfmt parsers (Loki, Vector, `hl`) read each line;
- `json`: one object per line: `ts` (RFC 3339, UTC), `level`, `logger`, `msg`, and `exc`
  with the traceback when there is one.

The agent's lines read `event key=value …` (`http.error status=404 method=GET …`): in
`logfmt` and `json` the event and each `key=%…` pair of the message's template come out as
fields of their own (`"event": "http.error", "status": 404`), typed as the argument was,
beside the whole message in `msg`; `RateLimited` adds `suppressed`. A field that would
clash with the line's own keys gets a trailing underscore.

Under systemd, stderr is a journald stream (`JOURNAL_STREAM` names its device and inode):
each line then starts with `<N>`, its syslog priority (sd-daemon(3)), so journald files a
warning as a warning rather than as the stream's default (info).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, TextIO

Format = Literal["text", "logfmt", "json"]
LEVELS = ("debug", "info", "warning", "error")
# syslog priorities (sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7)
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def journald_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journald stream systemd connected (JOURNAL_STREAM is
    `device:inode` of it; a child that inherited the variable but not the fd is not)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


# `%` conversions of a %-format template (`%%` is a literal percent sign).
CONVERSION = re.compile(r"%%|%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[a-zA-Z]")
KEY_BEFORE = re.compile(r"(?:^|\s)([A-Za-z_][\w.]*)=$")
EVENT = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+$")
OWN_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "event"})


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The event and key=value fields of an `event key=%s …` line, from its template and
    arguments (never by re-parsing the formatted text: a value may hold spaces or `=`),
    plus any `extra={"fields": {...}}` the caller gave."""
    out: dict[str, object] = {}
    template = record.msg if isinstance(record.msg, str) else ""
    args = record.args if isinstance(record.args, tuple) else ()
    first = template.split(" ", 1)[0]
    index = 0
    for m in CONVERSION.finditer(template):
        if m.group() == "%%":
            continue
        if m.start() == 0 and index < len(args):  # "%s …": the event is an argument
            first = ""
        key = KEY_BEFORE.search(template, 0, m.start())
        if key and key.end() == m.start() and index < len(args):
            out[key.group(1)] = _jsonable(args[index])
        index += 1
    if first and "%" not in first and EVENT.match(first):
        out = {"event": first, **out}
    elif first and "%" in first:  # "trust.%s_failed": the event with its argument
        try:
            formatted = record.getMessage().split(" ", 1)[0]
        except (TypeError, ValueError):
            formatted = ""
        if EVENT.match(formatted):
            out = {"event": formatted, **out}
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        out.update({str(k): _jsonable(v) for k, v in extra.items()})
    return {(f"{k}_" if k in OWN_KEYS - {"event"} else k): v for k, v in out.items()}


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t') and value.isprintable():
        return value
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class LineFormatter(logging.Formatter):
    def __init__(self, fmt: Format, *, journald: bool) -> None:
        super().__init__()
        self.fmt = fmt
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        exc = self.formatException(record.exc_info) if record.exc_info else None
        level = record.levelname.lower()
        if self.fmt == "json":
            obj: dict[str, object] = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"), "level": level, "logger": record.name,
                **fields(record), "msg": msg}
            if exc:
                obj["exc"] = exc
            line = json.dumps(obj, ensure_ascii=False)
        elif self.fmt == "logfmt":
            pairs = "".join(f" {k}={_logfmt_value(_text(v))}" for k, v in
                            fields(record).items())
            line = (f"level={level} logger={_logfmt_value(record.name)}{pairs} "
                    f"msg={_logfmt_value(msg)}")
            if exc:
                line += f" exc={_logfmt_value(exc)}"
        else:
            line = f"{record.levelname} {record.name} {msg}"
            if exc:
                line += "\n" + exc
        if self.journald:
            prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
            # journald reads each line on its own: every line of a traceback gets the prefix
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


def configure(fmt: Format = "text", level: str = "info",
              stream: TextIO | None = None) -> None:
    """Route the root logger to stderr in `fmt` at `level` (one of LEVELS)."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter(fmt, journald=journald_stream(out)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RateLimited:
    """A logger for lines that can repeat without bound (client errors, refusals, a broker
    that stays down): per key, the first line at once, then at most one per `interval_s`
    carrying how many were suppressed since. Thread-safe; bounded by `max_keys` (the
    oldest key is forgotten)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, *,
                 max_keys: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (last, held)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log unless `key` logged within interval_s; returns whether it logged."""
        now = self.clock()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        if held:
            msg += f" (and {held} more like it in the last %ds)"
            args = (*args, round(self.interval_s))
        self.logger.log(level, msg, *args, extra={"fields": {"suppressed": held}}
                        if held else None)
        return True

    def forget(self, key: str) -> int:
        """Drop `key` (its condition ended); returns how many lines it held back."""
        with self._lock:
            _, held = self._seen.pop(key, (None, 0))
        return held
