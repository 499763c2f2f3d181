"""Load a ruleset's YAML or JSON text into plain values, keeping line and column of each node.

Nothing is constructed by a YAML constructor: the text is composed into nodes and walked
here, so no tag can build an object, every scalar stays the exact text written (no float
ever exists), aliases are expanded under a node budget, and nesting depth is bounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from engine.problems import Problem

MAX_SOURCE_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 32

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "timestamp", "null", "bool")}

Value = str | bool | None | list["Value"] | dict[str, "Value"]


@dataclass
class SourceDocument:
    """A parsed document: its values and where each path starts in the text."""

    data: Value
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)

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


def child_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
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
    size = len(text.encode("utf-8"))
    if size > MAX_SOURCE_BYTES:
        raise SourceError(_too_large(size))
    if text.lstrip().startswith(("{", "[")):
        _check_json_syntax(text)
    try:
        root = YAML(typ="safe", pure=True).compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise SourceError(Problem("source.syntax", "", f"{exc.problem or exc.context}", line=line, column=column)) from exc
    except YAMLError as exc:
        raise SourceError(Problem("source.syntax", "", str(exc))) from exc
    except RecursionError as exc:
        raise SourceError(Problem("source.too_deep", "", f"nesting deeper than {MAX_DEPTH}")) from exc
    if root is None:
        raise SourceError(Problem("source.empty", "", "the document is empty"))
    walker = _Walker()
    data = walker.walk(root, "", 0)
    return SourceDocument(data, walker.positions)


def _too_large(size: int) -> Problem:
    return Problem("source.too_large", "", f"{size} bytes; at most {MAX_SOURCE_BYTES} are accepted")


def _check_json_syntax(text: str) -> None:
    try:
        json.loads(text, parse_float=str, parse_int=str, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(Problem("source.syntax", "", exc.msg, line=exc.lineno, column=exc.colno)) from exc
    except ValueError as exc:
        raise SourceError(Problem("source.syntax", "", str(exc))) from exc
    except RecursionError as exc:
        raise SourceError(Problem("source.too_deep", "", f"nesting deeper than {MAX_DEPTH}")) from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a ruleset may contain")


class _Walker:
    def __init__(self) -> None:
        self.positions: dict[str, tuple[int, int]] = {}
        self.nodes = 0

    def _fail(self, code: str, path: str, message: str, node: Node) -> SourceError:
        mark = node.start_mark
        return SourceError(Problem(code, path, message, line=mark.line + 1, column=mark.column + 1))

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
            return str(node.value)
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
                key = str(key_node.value)
                if key in result:
                    raise self._fail("source.duplicate_key", child_path(path, key), f"key {key!r} appears twice", key_node)
                result[key] = self.walk(value_node, child_path(path, key), depth + 1)
            return result
        raise self._fail("source.syntax", path, "unsupported node", node)
