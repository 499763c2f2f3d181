"""Load a ruleset's YAML or JSON text into plain values, keeping line and column of each node.

Nothing is constructed by a YAML constructor: the text is composed into nodes and walked
here, so no tag can build an object, every scalar stays the exact text written (no float
ever exists), aliases are expanded under a node budget, and nesting depth is bounded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.parser import Parser
from ruamel.yaml.reader import ReaderError

from engine.problems import Problem

MAX_SOURCE_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 32

_TAG = "tag:yaml.org,2002:"
#: What the YAML reader refuses as raw text (its NON_PRINTABLE set); a scalar may still
#: carry it through an escape such as "\uD800" or "\x00". A lone surrogate cannot even be
#: encoded as UTF-8 (to hash or store the value), so these are refused wherever they come from.
_NOT_TEXT = re.compile(r"[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NODE_EVENTS = (ScalarEvent, SequenceStartEvent, MappingStartEvent, AliasEvent)
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "timestamp", "null", "bool")}

Value = str | bool | None | list["Value"] | dict[str, "Value"]


@dataclass
class SourceDocument:
    """A parsed document: its values and where each path starts in the text."""

    data: Value
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def key_position(self, path: str) -> tuple[int, int]:
        """Where the key of `path` is written (for problems about the key itself)."""
        return self.key_positions.get(path) or self.position(path)

    def position(self, path: str) -> tuple[int, int]:
        """Line and column of `path`, or of its nearest ancestor that has one."""
        while True:
            if path in self.positions:
                return self.positions[path]
            if not path:
                return (0, 0)
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""


class SourceError(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


#: A key written as it is in a path; any other key (an unknown one may be any text) is
#: written as a JSON string in brackets, so that a path always reads one way.
_PLAIN_KEY = re.compile(r'[^.\[\]"]+')


def child_path(parent: str, key: str | int) -> str:
    """`fees[2].tiers[1].up_to`; a key that is not plain text reads `metrics["a.b"]`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if not _PLAIN_KEY.fullmatch(key):
        return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"
    return f"{parent}.{key}" if parent else key


def load_source(text: str | bytes) -> SourceDocument:
    """Parse YAML or JSON text. Raises SourceError with a positioned problem."""
    if isinstance(text, bytes):
        if len(text) > MAX_SOURCE_BYTES:
            raise SourceError(_too_large(len(text)))
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(Problem("source.encoding", "", f"not UTF-8: {exc.reason}")) from exc
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise SourceError(Problem("source.encoding", "", f"not valid Unicode text: {exc.reason}")) from exc
    if size > MAX_SOURCE_BYTES:
        raise SourceError(_too_large(size))
    _check_flow_depth(text)
    if text.lstrip().startswith(("{", "[")):
        _check_json_syntax(text)
    try:
        root = _compose(text)
    except _TooManyNodes as exc:
        raise SourceError(
            Problem("source.too_many_nodes", "", f"more than {MAX_NODES} nodes", line=exc.mark.line + 1, column=exc.mark.column + 1)
        ) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise SourceError(Problem("source.syntax", "", f"{exc.problem or exc.context}", line=line, column=column)) from exc
    except ReaderError as exc:  # a character YAML does not take as text: where it is
        line, column = _line_column(text, exc.position)
        raise SourceError(Problem("source.syntax", "", str(exc), line=line, column=column)) from exc
    except YAMLError as exc:
        raise SourceError(Problem("source.syntax", "", str(exc))) from exc
    except RecursionError as exc:
        raise SourceError(Problem("source.too_deep", "", f"nesting deeper than {MAX_DEPTH}")) from exc
    if root is None:
        raise SourceError(Problem("source.empty", "", "the document is empty"))
    walker = _Walker()
    data = walker.walk(root, "", 0)
    return SourceDocument(data, walker.positions, walker.key_positions)


class _TooManyNodes(Exception):
    def __init__(self, mark: Any) -> None:
        self.mark = mark
        super().__init__("too many nodes")


class _CountingParser(Parser):
    """ruamel's parser, counting the nodes it hands the composer and giving up past MAX_NODES."""

    def __init__(self, loader: Any) -> None:
        super().__init__(loader)
        self.nodes = 0

    def get_event(self) -> Any:
        event = super().get_event()
        if isinstance(event, _NODE_EVENTS):
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise _TooManyNodes(event.start_mark)
        return event


class _QuietComposer(Composer):
    """ruamel's composer without its warning about a reused anchor name (legal YAML; the
    warning would put every such hostile document into the server's log)."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False


def _compose(text: str) -> Node | None:
    """The document's node tree, given up as soon as it has more than MAX_NODES nodes.

    Composing costs ~50 µs a node in pure Python: 256 KiB of `{a: 1},` is 150,000 nodes and
    seven seconds; counted as the parser hands them over, it stops after about one."""
    yaml = YAML(typ="safe", pure=True)
    yaml.Parser = _CountingParser
    yaml.Composer = _QuietComposer
    return yaml.compose(text)  # type: ignore[no-any-return]


def _line_column(text: str, offset: object) -> tuple[int, int]:
    """1-based line and column of a character offset in `text`, (0, 0) when there is none."""
    if not isinstance(offset, int) or not 0 <= offset <= len(text):
        return (0, 0)
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _too_large(size: int) -> Problem:
    return Problem("source.too_large", "", f"{size} bytes; at most {MAX_SOURCE_BYTES} are accepted")


def _check_json_syntax(text: str) -> None:
    try:
        json.loads(text, parse_float=str, parse_int=str, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(Problem("source.syntax", "", exc.msg, line=exc.lineno, column=exc.colno)) from exc
    except _ConstantRefused as exc:
        line, column = _locate(text, exc.name)
        raise SourceError(Problem("source.syntax", "", str(exc), line=line, column=column)) from exc
    except ValueError as exc:
        raise SourceError(Problem("source.syntax", "", str(exc))) from exc
    except RecursionError as exc:
        raise SourceError(Problem("source.too_deep", "", f"nesting deeper than {MAX_DEPTH}")) from exc


def _locate(text: str, word: str) -> tuple[int, int]:
    """1-based line and column of the first `word` outside a string, or (0, 0)."""
    match = re.search(rf'^(?:[^"\n]|"(?:[^"\\\n]|\\.)*")*?(?<![A-Za-z"])({re.escape(word)})', text, re.MULTILINE)
    if not match:
        return (0, 0)
    start = match.start(1)
    line = text.count("\n", 0, start) + 1
    return line, start - (text.rfind("\n", 0, start) + 1) + 1


def _reject_constant(name: str) -> None:
    raise _ConstantRefused(name)


class _ConstantRefused(ValueError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name} is not a number a ruleset may contain")


def _check_flow_depth(text: str) -> None:
    """Refuse [[[[… before the YAML parser spends seconds on it (brackets in strings count
    too; no real ruleset comes near the bound)."""
    depth = 0
    for offset, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > 2 * MAX_DEPTH:
                line, column = _line_column(text, offset)
                raise SourceError(Problem("source.too_deep", "", f"nesting deeper than {MAX_DEPTH}", line=line, column=column))
        elif char in "]}":
            depth -= 1


class _Walker:
    def __init__(self) -> None:
        self.positions: dict[str, tuple[int, int]] = {}
        self.key_positions: dict[str, tuple[int, int]] = {}
        self.nodes = 0

    def _fail(self, code: str, path: str, message: str, node: Node) -> SourceError:
        mark = node.start_mark
        return SourceError(Problem(code, path, message, line=mark.line + 1, column=mark.column + 1))

    def _text(self, node: Node, path: str) -> str:
        text = str(node.value)
        bad = _NOT_TEXT.search(text)
        if bad:
            code = f"U+{ord(bad.group()):04X}"
            raise self._fail("source.character", path, f"the character {code} (written as an escape) is not allowed in a ruleset", node)
        return text

    def walk(self, node: Node, path: str, depth: int) -> Value:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self._fail("source.too_many_nodes", path, f"more than {MAX_NODES} nodes (alias expansion counts)", node)
        if depth > MAX_DEPTH:
            raise self._fail("source.too_deep", path, f"nesting deeper than {MAX_DEPTH}", node)
        self.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise self._fail("source.tag_not_allowed", path, f"tag {node.tag!r} is not allowed", node)
            if node.tag == _TAG + "null" and not node.style:
                return None
            if node.tag == _TAG + "bool" and not node.style:
                return str(node.value).lower() == "true"
            return self._text(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _TAG + "seq":
                raise self._fail("source.tag_not_allowed", path, f"tag {node.tag!r} is not allowed", node)
            return [self.walk(item, child_path(path, i), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != _TAG + "map":
                raise self._fail("source.tag_not_allowed", path, f"tag {node.tag!r} is not allowed", node)
            result: dict[str, Value] = {}
            for key_node, value_node in node.value:
                self.nodes += 1
                if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                    raise self._fail("source.bad_key", path, "mapping keys must be plain text", key_node)
                key = self._text(key_node, path)
                if key in result:
                    raise self._fail("source.duplicate_key", child_path(path, key), f"key {key!r} appears twice", key_node)
                self.key_positions.setdefault(child_path(path, key), (key_node.start_mark.line + 1, key_node.start_mark.column + 1))
                result[key] = self.walk(value_node, child_path(path, key), depth + 1)
            return result
        raise self._fail("source.syntax", path, "unsupported node", node)
