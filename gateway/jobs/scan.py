"""Find the value at one dotted path of a JSON document while its body streams past, without
keeping the document. Pure.

`FieldScan` is fed the (decoded) body chunk by chunk. It descends along the path, object keys
and list items by index as a parsed document's lookup reads them (tests/support/dotted.py), and skips every other value by tracking
only brackets and strings, so it keeps a few small buffers whatever the document's size, and
its answer is known with the chunk that completes the value (or closes the object or list that
would have held it): a status field after a 10 MB `data` array is found, one before it is found
at once and the rest is never looked at.

What is skipped is not validated (json.loads would refuse some documents this reads), and the
first occurrence of a key wins where json.loads keeps the last; a malformed document around
the path, or one that ends first, is `UNREADABLE`.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

# A found value longer than this (raw JSON bytes) is reported as TOO_LONG, not kept.
VALUE_CAP = 4096

_SPACE = re.compile(rb"[ \t\n\r]*")
_STRING_STOP = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,}\] \t\n\r]")
# Inside a skipped object or list: everything up to the next bracket or an unfinished string,
# complete strings included, in one C-level match (atomic groups: no backtracking).
_SKIP_RUN = re.compile(rb'(?>[^"{}\[\]]++|"(?>[^"\\]++|\\.)*+")*+', re.DOTALL)
_BOM = b"\xef\xbb\xbf"


class Scan(Enum):
    SCANNING = "scanning"
    FOUND = "found"  # `value` holds it
    ABSENT = "absent"  # nothing at the path (what lookup reads as None)
    UNREADABLE = "unreadable"  # malformed around the path, or the body ended first
    EMPTY = "empty"  # the body had nothing but white space


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


CONTAINER = _Marker("CONTAINER")  # the value at the path is an object or a list
TOO_LONG = _Marker("TOO_LONG")  # a string or number over VALUE_CAP
_INVALID = _Marker("INVALID")  # a key or value json.loads refuses

# What the scanner expects next.
_VALUE, _KEY, _KEY_STRING, _COLON, _AFTER, _FIRST_ITEM = range(6)
_SKIP_STRING, _SKIP_SCALAR, _SKIP_CONTAINER, _VALUE_STRING, _VALUE_SCALAR = range(6, 11)


def _index(part: str) -> int | None:
    """The list index a path part names (as a parsed document's lookup reads it), or None."""
    if not part.isdigit():
        return None
    try:
        return int(part)
    except ValueError:  # a digit int() does not take ("²")
        return None


class FieldScan:
    __slots__ = ("_parts", "_depth", "_mode", "_skip", "_list", "_item", "_match", "_buffer",
                 "_cap", "_escaped", "_nested", "_in_string", "_started", "_dead_end", "state", "value")

    def __init__(self, dotted: str) -> None:
        self._parts = dotted.split(".")
        self._depth = 0  # path parts consumed to reach the value being read
        self._mode = _VALUE
        self._skip = False  # the value expected next is off the path
        self._list = False  # the container being walked on the path is a list
        self._item = 0  # its current item
        self._match = False  # the key just read is the next path part
        self._buffer = bytearray()  # a key or the found value being read, bounded
        self._cap = 0
        self._escaped = False  # a string's backslash ended the last chunk
        self._nested = 0  # open brackets of a skipped value
        self._in_string = False  # inside a string of a skipped value
        self._started = False
        self._dead_end = False  # the scalar being read stands where the path needs a container
        self.state = Scan.SCANNING
        self.value: Any = None

    @property
    def done(self) -> bool:
        return self.state is not Scan.SCANNING

    def feed(self, data: bytes) -> bool:
        """Read the next chunk; True once the answer is known (later chunks are ignored)."""
        if self.done or not data:
            return self.done
        pos = 0
        if not self._started:
            pos = _SPACE.match(data).end()
            if pos == len(data):
                return False
            self._started = True
            if data.startswith(_BOM, pos):  # json.loads takes a UTF-8 BOM
                pos += len(_BOM)
        end = len(data)
        while pos < end and not self.done:
            pos = self._STEPS[self._mode](self, data, pos)
        return self.done

    def abandon(self) -> None:
        """The body cannot be read (its coding, its size): UNREADABLE, unless already answered."""
        if not self.done:
            self.state = Scan.UNREADABLE

    def finish(self) -> Scan:
        """The body ended: the answer, UNREADABLE if it was still open (EMPTY if it had none)."""
        if not self.done and self._mode == _VALUE_SCALAR and self._depth == 0:
            self._value_read()  # a document that is one number or literal: its end ends it
        if not self.done:
            self.state = Scan.UNREADABLE if self._started else Scan.EMPTY
        return self.state

    # -- outcomes (each returns a position for the step that ends with it: `feed` stops anyway)

    def _found(self, value: Any) -> int:
        self.state, self.value = Scan.FOUND, value
        return 0

    def _absent(self) -> int:
        self.state = Scan.ABSENT
        return 0

    def _unreadable(self) -> int:
        self.state = Scan.UNREADABLE
        return 0

    # -- the values on the path --------------------------------------------------------------

    def _value(self, data: bytes, pos: int) -> int:
        pos = _SPACE.match(data, pos).end()
        if pos == len(data):
            return pos
        char = data[pos : pos + 1]
        if char in b"}],:":
            return self._unreadable()
        if self._skip:
            return self._skip_start(char, pos)
        if self._depth == len(self._parts):
            return self._target_start(char, pos)
        part = self._parts[self._depth]
        if char == b"{":
            self._list, self._mode = False, _KEY
            self._cap = 6 * len(part.encode("utf-8", "surrogatepass")) + 2  # longest spelling of it
            return pos + 1
        if char == b"[" and _index(part) is not None:
            self._list, self._item, self._mode = True, 0, _FIRST_ITEM
            return pos + 1
        if char == b"[":
            return self._absent()  # a list named by a key: lookup finds nothing there
        self._dead_end = True  # nor in a scalar, once it is known to be one
        return self._target_start(char, pos)

    def _target_start(self, char: bytes, pos: int) -> int:
        if char in b"{[":
            return self._found(CONTAINER)
        self._cap = VALUE_CAP
        if char == b'"':
            self._buffer[:] = b'"'
            self._mode = _VALUE_STRING
            return pos + 1
        self._buffer.clear()
        self._mode = _VALUE_SCALAR
        return pos

    def _key(self, data: bytes, pos: int) -> int:
        pos = _SPACE.match(data, pos).end()
        if pos == len(data):
            return pos
        char = data[pos : pos + 1]
        if char == b"}":
            return self._absent()
        if char != b'"':
            return self._unreadable()
        self._buffer[:] = b'"'
        self._mode = _KEY_STRING
        return pos + 1

    def _key_string(self, data: bytes, pos: int) -> int:
        pos, closed = self._string(data, pos, keep=True)
        if closed:
            key = self._decoded() if len(self._buffer) <= self._cap else None  # too long to match
            if key is _INVALID:
                return self._unreadable()
            self._match = key == self._parts[self._depth]
            self._mode = _COLON
        return pos

    def _colon(self, data: bytes, pos: int) -> int:
        pos = _SPACE.match(data, pos).end()
        if pos == len(data):
            return pos
        if data[pos : pos + 1] != b":":
            return self._unreadable()
        self._enter_member(self._match)
        return pos + 1

    def _first_item(self, data: bytes, pos: int) -> int:
        pos = _SPACE.match(data, pos).end()
        if pos == len(data):
            return pos
        if data[pos : pos + 1] == b"]":
            return self._absent()
        self._enter_member(self._item == _index(self._parts[self._depth]))
        return pos

    def _after(self, data: bytes, pos: int) -> int:
        """After a skipped member of the container on the path: its next member, or its end."""
        pos = _SPACE.match(data, pos).end()
        if pos == len(data):
            return pos
        char = data[pos : pos + 1]
        if char in b"}]":
            return self._absent()  # closed without the path's next part
        if char != b",":
            return self._unreadable()
        if self._list:
            self._item += 1
            self._enter_member(self._item == _index(self._parts[self._depth]))
        else:
            self._mode = _KEY
        return pos + 1

    def _enter_member(self, on_path: bool) -> None:
        self._mode = _VALUE
        self._skip = not on_path
        if on_path:
            self._depth += 1  # never back: the path can only be inside this member now

    def _value_string(self, data: bytes, pos: int) -> int:
        pos, closed = self._string(data, pos, keep=True)
        if closed:
            return self._value_read()
        return pos

    def _value_scalar(self, data: bytes, pos: int) -> int:
        stop = _SCALAR_END.search(data, pos)
        end = len(data) if stop is None else stop.start()
        if len(self._buffer) <= self._cap:
            self._buffer += data[pos:end]
        if stop is not None:
            return self._value_read()
        return end

    def _value_read(self) -> int:
        value = self._decoded() if len(self._buffer) <= self._cap else TOO_LONG
        if value is _INVALID:
            return self._unreadable()
        return self._absent() if self._dead_end else self._found(value)

    def _decoded(self) -> Any:
        try:
            return json.loads(bytes(self._buffer))
        except ValueError:
            return _INVALID

    # -- strings, kept or not --------------------------------------------------------------

    def _string(self, data: bytes, pos: int, keep: bool) -> tuple[int, bool]:
        """Read a string's bytes up to its closing quote: (where reading stopped, closed).
        `keep` adds them to the buffer while it is within its cap."""
        end = len(data)
        while pos < end:
            if self._escaped:
                self._escaped = False
                if keep:
                    self._keep(data[pos : pos + 1])
                pos += 1
                continue
            stop = _STRING_STOP.search(data, pos)
            if stop is None:
                if keep:
                    self._keep(data[pos:])
                return end, False
            at = stop.start()
            if keep:
                self._keep(data[pos : at + 1])
            pos = at + 1
            if data[at] == 0x22:  # '"'
                return pos, True
            self._escaped = True
        return pos, False

    def _keep(self, data: bytes) -> None:
        if len(self._buffer) <= self._cap:
            self._buffer += data[: self._cap + 1 - len(self._buffer)]

    # -- skipped values --------------------------------------------------------------------

    def _skip_start(self, char: bytes, pos: int) -> int:
        if char in b"{[":
            self._nested, self._in_string, self._mode = 1, False, _SKIP_CONTAINER
            return pos + 1
        if char == b'"':
            self._mode = _SKIP_STRING
            return pos + 1
        self._mode = _SKIP_SCALAR
        return pos

    def _skip_string(self, data: bytes, pos: int) -> int:
        pos, closed = self._string(data, pos, keep=False)
        if closed:
            self._mode = _AFTER
        return pos

    def _skip_scalar(self, data: bytes, pos: int) -> int:
        stop = _SCALAR_END.search(data, pos)
        if stop is None:
            return len(data)
        self._mode = _AFTER
        return stop.start()

    def _skip_container(self, data: bytes, pos: int) -> int:
        end = len(data)
        while pos < end:
            if self._in_string:
                pos, closed = self._string(data, pos, keep=False)
                self._in_string = not closed
                continue
            pos = _SKIP_RUN.match(data, pos).end()
            if pos == end:
                break
            char = data[pos]
            pos += 1
            if char == 0x22:  # a string the chunk ends inside
                self._in_string = True
            elif char in (0x7B, 0x5B):  # { [
                self._nested += 1
            else:  # } ]
                self._nested -= 1
                if self._nested == 0:
                    self._mode = _AFTER
                    return pos
        return pos

    _STEPS = {
        _VALUE: _value, _KEY: _key, _KEY_STRING: _key_string, _COLON: _colon, _AFTER: _after,
        _FIRST_ITEM: _first_item, _SKIP_STRING: _skip_string, _SKIP_SCALAR: _skip_scalar,
        _SKIP_CONTAINER: _skip_container, _VALUE_STRING: _value_string, _VALUE_SCALAR: _value_scalar,
    }  # fmt: skip
