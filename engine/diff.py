"""What changed between two ruleset versions, in business terms (SPEC §6 DiffRulesetVersions).

The diff works on the parsed values (`load_source(...).data`), not on text lines and not on
the validated model, so it also works for versions that only parse. Comments, quoting and
layout never count. Numbers are compared as exact decimals (`28%` equals `0.28`),
expressions by their syntax tree (`acos>28%` equals `acos > 0.28`). Fees and warnings are
matched by id, everything named (metrics, params, exemptions, KPIs, markets) by name, so
reordering fees is reported as a move, never as a removal and an addition. Tiers and steps
are matched by position (tier 2 is the second band). `examples` are only counted.

Output order is the document order: top-level sections in the new version's order, items
in the new version's order with removed items where they stood in the old one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from engine.expressions import Arith, Bool, Compare, ExpressionError, Logic, Name, Neg, Node, Not, Num, Str, parse
from engine.money import ARITHMETIC, DecimalTextError, parse_decimal, plain
from engine.problems import RulesetInvalid
from engine.source import SourceError, child_path, load_source

ADDED = "ADDED"
REMOVED = "REMOVED"
CHANGED = "CHANGED"


@dataclass(frozen=True, slots=True)
class Change:
    """One business-level difference. `path` is in the new version (the old one for REMOVED)."""

    change: str  # ADDED | REMOVED | CHANGED
    path: str
    description: str
    before: str
    after: str


def diff_rulesets(old_source: str, new_source: str) -> list[Change]:
    """Business-level changes from `old_source` to `new_source`, in document order.

    Raises RulesetInvalid (with the parse problem) when either text cannot be parsed.
    """
    old, new = _load(old_source), _load(new_source)
    differ = _Differ()
    differ.document(old, new)
    return differ.changes


def _load(source: str) -> Any:
    try:
        return load_source(source).data
    except SourceError as exc:
        raise RulesetInvalid([exc.problem]) from exc


# ---------------------------------------------------------------- values


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

Kind = str  # expr | rate | decimal | text | long_text | set | flag


def _render(value: Any) -> str:
    """Any parsed value as one line of text."""
    if value is MISSING:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


def _decimal(value: Any) -> Decimal | None:
    try:
        return parse_decimal(value, allow_percent=True)
    except DecimalTextError:
        return None


def _percent(value: Any) -> str:
    """A rate as a percentage (`0.06` and `6%` both read `6%`); other text as written."""
    number = _decimal(value)
    if number is None:
        return _render(value)
    text = plain(number.scaleb(2, ARITHMETIC))
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}%"


def _tree(node: Node) -> object:
    """A comparable form of a syntax tree: offsets and the spelling of numbers do not count."""
    if isinstance(node, Num):
        return ("num", node.value)
    if isinstance(node, Str):
        return ("str", node.value)
    if isinstance(node, Bool):
        return ("bool", node.value)
    if isinstance(node, Name):
        return ("name", node.name)
    if isinstance(node, (Neg, Not)):
        return (type(node).__name__, _tree(node.operand))
    if isinstance(node, (Arith, Compare)):
        return (type(node).__name__, node.op, _tree(node.left), _tree(node.right))
    if isinstance(node, Logic):
        return ("logic", node.op, tuple(_tree(o) for o in node.operands))
    return ("call", node.function, tuple(_tree(a) for a in node.args))


def _expression_key(value: Any) -> object:
    if isinstance(value, str):
        try:
            return ("expr", _tree(parse(value)))
        except (ExpressionError, RecursionError):
            return ("text", " ".join(value.split()))
    return ("value", _render(value)) if value is not MISSING else MISSING


def _same(kind: Kind, a: Any, b: Any) -> bool:
    if a is MISSING or b is MISSING:
        return a is b
    if kind == "expr":
        return _expression_key(a) == _expression_key(b)
    if kind in ("rate", "decimal"):
        x, y = _decimal(a), _decimal(b)
        if x is not None and y is not None:
            return x == y
        return _render(a) == _render(b)
    if kind == "set":
        return sorted(map(_render, _as_list(a))) == sorted(map(_render, _as_list(b)))
    if kind in ("text", "long_text"):
        return _render(a) == _render(b)  # line breaks and runs of spaces do not count
    return bool(a == b)


def _show(kind: Kind, value: Any) -> str:
    if value is MISSING:
        return ""
    if kind == "rate":
        return _percent(value)
    if kind == "set":
        return ", ".join(_render(v) for v in _as_list(value)) or "none"
    if kind == "flag":
        return "yes" if value is True or _render(value).lower() == "true" else "no"
    return _render(value)


def _as_list(value: Any) -> list[Any]:
    if value is MISSING or value is None:
        return []
    return value if isinstance(value, list) else [value]


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key, MISSING) if isinstance(mapping, dict) else MISSING


def _keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys of both mappings: the new one's order, then keys only in the old one."""
    return [*new, *(k for k in old if k not in new)]


def _merged(old_keys: list[str], new_keys: list[str]) -> list[str]:
    """Every key once: the new order, each removed key placed where it stood in the old order."""
    new_set, old_index = set(new_keys), {k: i for i, k in enumerate(old_keys)}
    removed = [k for k in old_keys if k not in new_set]
    result, r = [], 0
    for key in new_keys:
        if key in old_index:
            while r < len(removed) and old_index[removed[r]] < old_index[key]:
                result.append(removed[r])
                r += 1
        result.append(key)
    result.extend(removed[r:])
    return result


def _moved(old_keys: list[str], new_keys: list[str]) -> set[str]:
    """The fewest keys whose moving explains the new order (those outside a longest common subsequence)."""
    old_index = {k: i for i, k in enumerate(old_keys)}
    common = [k for k in new_keys if k in old_index]
    sequence = [old_index[k] for k in common]
    tails: list[int] = []  # tails[length-1] = index into sequence of the smallest tail
    parent = [-1] * len(sequence)
    for i, value in enumerate(sequence):
        j = _bisect(sequence, tails, value)
        parent[i] = tails[j - 1] if j > 0 else -1
        if j == len(tails):
            tails.append(i)
        else:
            tails[j] = i
    kept: set[str] = set()
    i = tails[-1] if tails else -1
    while i >= 0:
        kept.add(common[i])
        i = parent[i]
    return {k for k in common if k not in kept}


def _bisect(sequence: list[int], tails: list[int], value: int) -> int:
    low, high = 0, len(tails)
    while low < high:
        middle = (low + high) // 2
        if sequence[tails[middle]] < value:
            low = middle + 1
        else:
            high = middle
    return low


def _label_pair(value: Any, fallback: str) -> tuple[str, str]:
    """A label (plain text or {en, zh}) as (en, zh), with the engine's fallbacks."""
    if isinstance(value, str):
        return value, value
    if isinstance(value, dict) and isinstance(value.get("en"), str):
        en = value["en"]
        zh = value.get("zh")
        return en, zh if isinstance(zh, str) else en
    return fallback, fallback


# ---------------------------------------------------------------- the differ


_INPUT_FIELDS: dict[str, tuple[Kind, str]] = {
    "type": ("text", "type"),
    "definition": ("long_text", "definition"),
    "default": ("decimal", "default"),
    "target": ("flag", "target"),
}
_EXEMPTION_FIELDS: dict[str, tuple[Kind, str]] = {
    "when": ("expr", "condition"),
    "prorate_targets_by": ("expr", "prorates targets by"),
    "definition": ("long_text", "definition"),
}
_KPI_FIELDS: dict[str, tuple[Kind, str]] = {
    "formula": ("expr", "formula"),
    "on_zero_division": ("decimal", "value on division by zero"),
    "type": ("text", "type"),
    "definition": ("long_text", "definition"),
}
_FEE_FIELDS: dict[str, tuple[Kind, str]] = {
    "kind": ("text", "kind"),
    "when": ("expr", "condition"),
    "amount": ("expr", "amount"),
    "basis": ("expr", "basis"),
    "rate": ("rate", "rate"),
    "of": ("expr", "rate applies to"),
    "mode": ("text", "tier mode"),
    "prorate": ("text", "proration"),
    "steps_on": ("expr", "steps measured on"),
    "exempt_by": ("set", "exempted by"),
}
_WARNING_FIELDS: dict[str, tuple[Kind, str]] = {"when": ("expr", "condition")}
_MARKET_FIELDS: dict[str, tuple[Kind, str]] = {"multiplier": ("decimal", "multiplier")}
_PAYOUT = ("amount", "rate", "of")
MAX_SHOWN = 300  # longer values (definitions, unknown sections) are named in the description, not quoted


class _Differ:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def add(self, change: str, path: str, description: str, before: str = "", after: str = "") -> None:
        self.changes.append(Change(change, path, description, before, after))

    def whole(self, change: str, path: str, what: str, text: str) -> None:
        """An item added or removed as a whole, with its summary."""
        verb = "added" if change == ADDED else "removed"
        description = f"{what} {verb}" if len(text) > MAX_SHOWN else f"{what} {verb}: {text}"
        self.add(change, path, description, text if change == REMOVED else "", text if change == ADDED else "")

    # -- one value
    def field(self, path: str, subject: str, attr: str, kind: Kind, old: Any, new: Any, default: Any = MISSING, colon: str = ":") -> None:
        """Compare one value; a missing value with a default counts as that default."""
        if old is MISSING:
            old = default
        if new is MISSING:
            new = default
        if _same(kind, old, new):
            return
        what = f"{subject} {attr}".strip()
        before, after = _show(kind, old), _show(kind, new)
        brief = kind == "long_text" or len(before) + len(after) > MAX_SHOWN
        if old is MISSING:
            self.add(ADDED, path, f"{what} added" if brief else f"{what} added: {after}", "", after)
        elif new is MISSING:
            self.add(REMOVED, path, f"{what} removed" if brief else f"{what} removed: {before}", before, "")
        elif brief:
            self.add(CHANGED, path, f"{what} changed", before, after)
        else:
            self.add(CHANGED, path, f"{what}{colon} {before} → {after}", before, after)

    def label(self, path: str, subject: str, attr: str, old: Any, new: Any, fallback: str) -> None:
        old_pair, new_pair = _label_pair(old, fallback), _label_pair(new, fallback)
        for i, language in enumerate(("en", "zh")):
            if old_pair[i] != new_pair[i]:
                self.add(CHANGED, path, f"{subject} {attr} ({language}): {old_pair[i]} → {new_pair[i]}", old_pair[i], new_pair[i])

    def fields(
        self,
        path: str,
        subject: str,
        old: Any,
        new: Any,
        known: dict[str, tuple[Kind, str]],
        special: dict[str, Callable[[str, Any, Any], None]] | None = None,
        skip: tuple[str, ...] = (),
    ) -> None:
        """Every key of two mappings: known ones with their kind, special ones by a handler, others as text."""
        if not isinstance(old, dict) or not isinstance(new, dict):
            self.field(path, subject, "", "text", old, new)
            return
        special = special or {}
        for key in _keys(old, new):
            if key in skip:
                continue
            where = child_path(path, key)
            if key in special:
                special[key](where, old.get(key, MISSING), new.get(key, MISSING))
            else:
                kind, attr = known.get(key, ("text", key))
                self.field(where, subject, attr, kind, old.get(key, MISSING), new.get(key, MISSING))

    # -- the document
    def document(self, old: Any, new: Any) -> None:
        if not isinstance(old, dict) or not isinstance(new, dict):
            self.field("", "", "document", "text", old, new)
            return
        sections: dict[str, Callable[[Any, Any], None]] = {
            "rounding": lambda o, n: self.field("rounding", "", "rounding", "text", o, n, default="half_up"),
            "metrics": lambda o, n: self.named("metrics", "metric", o, n, self.input, _summary_input),
            "params": lambda o, n: self.named("params", "param", o, n, self.input, _summary_input),
            "exemptions": lambda o, n: self.named("exemptions", "exemption", o, n, self.exemption, _summary_exemption),
            "kpis": lambda o, n: self.named("kpis", "KPI", o, n, self.kpi, _summary_kpi),
            "fees": self.fees,
            "markets": lambda o, n: self.named("markets", "market", o, n, self.market, _summary_market),
            "multiply": lambda o, n: self.field("multiply", "", "market multiplier applies to", "set", o, n, default=[]),
            "caps": self.caps,
            "warnings": self.warnings,
            "examples": self.examples,
        }
        for key in _keys(old, new):
            o, n = old.get(key, MISSING), new.get(key, MISSING)
            if key in sections:
                sections[key](o, n)
            else:
                self.field(key, "", key, "text", o, n)

    # -- named sections (mappings of name → spec)
    def named(
        self,
        section: str,
        noun: str,
        old: Any,
        new: Any,
        item: Callable[[str, str, Any, Any], None],
        summary: Callable[[Any], str],
    ) -> None:
        old = {} if old is MISSING or old is None else old
        new = {} if new is MISSING or new is None else new
        if not isinstance(old, dict) or not isinstance(new, dict):
            self.field(section, "", section, "text", old, new)
            return
        for name in _merged(list(old), list(new)):
            path = child_path(section, name)
            if name not in old:
                self.whole(ADDED, path, f"{noun} {name}", summary(new[name]))
            elif name not in new:
                self.whole(REMOVED, path, f"{noun} {name}", summary(old[name]))
            else:
                item(path, f"{noun} {name}", old[name], new[name])

    def input(self, path: str, subject: str, old: Any, new: Any) -> None:
        flag = {"target": lambda p, o, n: self.field(p, subject, "target", "flag", o, n, default=False)}
        self.fields(path, subject, old, new, _INPUT_FIELDS, flag)

    def exemption(self, path: str, subject: str, old: Any, new: Any) -> None:
        name = subject.split(" ", 1)[1]
        label = {"label": lambda p, o, n: self.label(p, subject, "label", o, n, name)}
        self.fields(path, subject, old, new, _EXEMPTION_FIELDS, label)

    def kpi(self, path: str, subject: str, old: Any, new: Any) -> None:
        self.fields(path, subject, old, new, _KPI_FIELDS)

    def market(self, path: str, subject: str, old: Any, new: Any) -> None:
        self.fields(path, subject, old, new, _MARKET_FIELDS)

    # -- lists of items with an id (fees, warnings)
    def listed(
        self,
        section: str,
        noun: str,
        old: Any,
        new: Any,
        item: Callable[[str, str, Any, Any], None],
        summary: Callable[[Any], str],
        report_moves: bool,
    ) -> None:
        old = [] if old is MISSING or old is None else old
        new = [] if new is MISSING or new is None else new
        if not isinstance(old, list) or not isinstance(new, list):
            self.field(section, "", section, "text", old, new)
            return
        old_keys, new_keys = _item_keys(old), _item_keys(new)
        old_at, new_at = {k: i for i, k in enumerate(old_keys)}, {k: i for i, k in enumerate(new_keys)}
        moved = (
            _moved([k for k in old_keys if not k.startswith("#")], [k for k in new_keys if not k.startswith("#")])
            if report_moves
            else set()
        )
        common = [k for k in new_keys if k in old_at]
        common_at = {k: i for i, k in enumerate(common)}
        for key in _merged(old_keys, new_keys):
            shown = _shown(key)
            if key not in old_at:
                self.whole(ADDED, f"{section}[{new_at[key]}]", f"{noun} {shown}", summary(new[new_at[key]]))
            elif key not in new_at:
                self.whole(REMOVED, f"{section}[{old_at[key]}]", f"{noun} {shown}", summary(old[old_at[key]]))
            else:
                path = f"{section}[{new_at[key]}]"
                if key in moved:
                    before, after = str(old_at[key] + 1), str(new_at[key] + 1)
                    anchor = _anchor(common_at[key], common)
                    self.add(CHANGED, path, f"{noun} {shown} moved {anchor} (position {before} → {after})", before, after)
                item(path, shown, old[old_at[key]], new[new_at[key]])

    def warnings(self, old: Any, new: Any) -> None:
        self.listed("warnings", "warning", old, new, self.warning, _summary_warning, report_moves=False)

    def warning(self, path: str, name: str, old: Any, new: Any) -> None:
        subject = f"warning {name}"
        message = {"message": lambda p, o, n: self.label(p, subject, "message", o, n, name)}
        self.fields(path, subject, old, new, _WARNING_FIELDS, message, skip=("id",))

    # -- fees
    def fees(self, old: Any, new: Any) -> None:
        self.listed("fees", "fee", old, new, self.fee, _summary_fee, report_moves=True)

    def fee(self, path: str, fee_id: str, old: Any, new: Any) -> None:
        if not isinstance(old, dict) or not isinstance(new, dict):
            self.field(path, fee_id, "", "text", old, new)
            return
        kinds = (_get(old, "kind"), _get(new, "kind"))
        stepped = all(isinstance(x, dict) and "steps_on" in x for x in (old, new))
        payout_done = False

        def payout(where: str, o: Any, n: Any) -> None:
            nonlocal payout_done
            if not payout_done:
                payout_done = True
                self.payout(path, fee_id, old, new)

        special: dict[str, Callable[[str, Any, Any], None]] = {
            "label": lambda p, o, n: self.label(p, fee_id, "label", o, n, fee_id),
            "tiers": lambda p, o, n: self.tiers(p, fee_id, o, n),
            "steps": lambda p, o, n: self.steps(p, fee_id, o, n),
            "mode": lambda p, o, n: self.field(p, fee_id, "tier mode", "text", o, n, default="graduated" if "tiered" in kinds else MISSING),
            "prorate": lambda p, o, n: self.field(p, fee_id, "proration", "text", o, n, default="none"),
            "exempt_by": lambda p, o, n: self.field(p, fee_id, "exempted by", "set", o, n, default=[]),
        }
        if not stepped and any(k in ("bonus", "penalty") for k in kinds):
            special.update({key: payout for key in _PAYOUT})
        self.fields(path, fee_id, old, new, _FEE_FIELDS, special, skip=("id",))

    def payout(self, path: str, subject: str, old: dict[str, Any], new: dict[str, Any], colon: str = ":") -> None:
        """What a bonus, a penalty or a step pays: an amount, or a rate of something."""
        shapes = (_payout_shape(old), _payout_shape(new))
        if shapes[0] == shapes[1] and shapes[0] is not None:
            for key in _PAYOUT:
                kind, attr = _FEE_FIELDS[key]
                self.field(child_path(path, key), subject, attr, kind, _get(old, key), _get(new, key), colon=colon)
            return
        before, after = _summary_payout(old), _summary_payout(new)
        if before != after:
            where = child_path(path, "amount" if shapes[1] == "amount" else "rate")
            self.field(where, subject, "payout", "text", before or MISSING, after or MISSING, colon=colon)

    def tiers(self, path: str, fee_id: str, old: Any, new: Any) -> None:
        old, new = _as_list(old), _as_list(new)
        for i in range(max(len(old), len(new))):
            where = f"{path}[{i}]"
            o, n = (old[i] if i < len(old) else MISSING), (new[i] if i < len(new) else MISSING)
            name = f"{fee_id} tier {i + 1}"
            if o is MISSING:
                self.whole(ADDED, where, f"{name} {_band(new, i)}", _summary_tier(new, i))
            elif n is MISSING:
                self.whole(REMOVED, where, f"{name} {_band(old, i)}", _summary_tier(old, i))
            elif not isinstance(o, dict) or not isinstance(n, dict):
                self.field(where, name, "", "text", o, n)
            else:
                for key in _keys(o, n):
                    ov, nv = o.get(key, MISSING), n.get(key, MISSING)
                    if key == "up_to":
                        self.field(child_path(where, key), name, "upper bound", "decimal", ov, nv)
                    elif key == "rate" and not _same("rate", ov, nv) and ov is not MISSING and nv is not MISSING:
                        before, after = _percent(ov), _percent(nv)
                        self.add(CHANGED, child_path(where, key), f"{name} {_band(new, i)} rate {before} → {after}", before, after)
                    else:
                        self.field(child_path(where, key), name, key, "rate" if key == "rate" else "text", ov, nv)

    def steps(self, path: str, fee_id: str, old: Any, new: Any) -> None:
        old, new = _as_list(old), _as_list(new)
        for i in range(max(len(old), len(new))):
            where = f"{path}[{i}]"
            o, n = (old[i] if i < len(old) else MISSING), (new[i] if i < len(new) else MISSING)
            name = f"{fee_id} step {i + 1}"
            if o is MISSING:
                self.whole(ADDED, where, name, _summary_step(n))
            elif n is MISSING:
                self.whole(REMOVED, where, name, _summary_step(o))
            elif not isinstance(o, dict) or not isinstance(n, dict):
                self.field(where, name, "", "text", o, n)
            else:
                self.field(child_path(where, "from"), name, "from", "decimal", _get(o, "from"), _get(n, "from"), colon="")
                self.payout(where, f"{name} (from {_render(_get(n, 'from'))})", o, n, colon="")
                for key in _keys(o, n):
                    if key not in ("from", *_PAYOUT):
                        self.field(child_path(where, key), name, key, "text", o.get(key, MISSING), n.get(key, MISSING))

    # -- caps
    def caps(self, old: Any, new: Any) -> None:
        old = {} if old is MISSING or old is None else old
        new = {} if new is MISSING or new is None else new
        if not isinstance(old, dict) or not isinstance(new, dict):
            self.field("caps", "", "caps", "text", old, new)
            return
        for key in _keys(old, new):
            o, n, path = old.get(key, MISSING), new.get(key, MISSING), child_path("caps", key)
            if key == "penalties":
                self.cap(path, "penalty cap", o, n, {"max_rate": ("rate", "rate"), "of": ("expr", "basis"), "max": ("decimal", "maximum")})
            elif key == "total":
                self.cap(path, "total", o, n, {"min": ("decimal", "floor"), "max": ("decimal", "cap")})
            else:
                self.field(path, "caps", key, "text", o, n)

    def cap(self, path: str, subject: str, old: Any, new: Any, known: dict[str, tuple[Kind, str]]) -> None:
        if old is MISSING or new is MISSING:
            self.whole(ADDED if old is MISSING else REMOVED, path, subject, _summary_cap(new if old is MISSING else old, known))
            return
        self.fields(path, subject, old, new, known)

    # -- examples: only their number
    def examples(self, old: Any, new: Any) -> None:
        before, after = len(_as_list(old)), len(_as_list(new))
        if before != after:
            self.add(CHANGED, "examples", f"examples: {before} → {after}", str(before), str(after))


def _anchor(i: int, common: list[str]) -> str:
    """Where the moved item `common[i]` now stands among the items of both versions: `before X` or `after X`."""
    if i + 1 < len(common):
        return f"before {_shown(common[i + 1])}"
    return f"after {_shown(common[i - 1])}" if i > 0 else "to the front"


def _shown(key: str) -> str:
    return key if not key.startswith("#") else f"at position {int(key[1:]) + 1}"


def _item_keys(items: list[Any]) -> list[str]:
    """Each item's id, or `#position` when it has none (or repeats one: only in invalid versions)."""
    keys: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        key = item.get("id") if isinstance(item, dict) else None
        if not isinstance(key, str) or key in seen or key.startswith("#"):
            key = f"#{i}"
        seen.add(key)
        keys.append(key)
    return keys


def _payout_shape(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return None
    if "amount" in spec:
        return "amount"
    return "rate" if "rate" in spec or "of" in spec else None


# ---------------------------------------------------------------- summaries (for added and removed items)


def _summary_payout(spec: Any) -> str:
    if not isinstance(spec, dict):
        return ""
    if "amount" in spec:
        return _render(spec["amount"])
    if "rate" in spec or "of" in spec:
        rate = _percent(spec["rate"]) if "rate" in spec else "?"
        return f"{rate} of {_render(spec['of'])}" if "of" in spec else rate
    return ""


def _summary_input(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    parts = [_render(spec.get("type", MISSING)) or "untyped"]
    if "default" in spec:
        parts.append(f"default {_render(spec['default'])}")
    if spec.get("target") is True:
        parts.append("target")
    if "definition" in spec:
        parts.append(f"definition: {_render(spec['definition'])}")
    return "; ".join(parts)


def _summary_exemption(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    parts = [f"when {_render(spec.get('when', MISSING))}"]
    if "prorate_targets_by" in spec:
        parts.append(f"prorates targets by {_render(spec['prorate_targets_by'])}")
    if "label" in spec:
        parts.append(f"label {' / '.join(dict.fromkeys(_label_pair(spec['label'], '')))}")
    return "; ".join(parts)


def _summary_kpi(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    parts = [f"formula {_render(spec.get('formula', MISSING))}"]
    if "on_zero_division" in spec:
        parts.append(f"value on division by zero {_render(spec['on_zero_division'])}")
    if "definition" in spec:
        parts.append(f"definition: {_render(spec['definition'])}")
    return "; ".join(parts)


def _summary_market(spec: Any) -> str:
    return f"multiplier {_render(spec.get('multiplier', MISSING))}" if isinstance(spec, dict) else _render(spec)


def _summary_warning(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    return f"when {_render(spec.get('when', MISSING))}: {_label_pair(spec.get('message'), _render(spec.get('id', '')))[0]}"


def _band(tiers: list[Any], i: int) -> str:
    """`(50000–100000)`, or `(100000 and above)` for the open last tier."""
    lower = _render(_get(tiers[i - 1], "up_to")) if i > 0 else "0"
    upper = _get(tiers[i], "up_to")
    return f"({lower} and above)" if upper is MISSING else f"({lower}–{_render(upper)})"


def _summary_tier(tiers: list[Any], i: int) -> str:
    return f"rate {_percent(_get(tiers[i], 'rate'))}" if isinstance(tiers[i], dict) else _render(tiers[i])


def _summary_step(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    return f"from {_render(spec.get('from', MISSING))}: {_summary_payout(spec)}"


def _summary_cap(spec: Any, known: dict[str, tuple[Kind, str]]) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    if "max_rate" in spec:
        return f"{_percent(spec['max_rate'])} of {_render(spec.get('of', MISSING))}"
    return ", ".join(f"{known.get(k, ('text', k))[1]} {_render(v)}" for k, v in spec.items())


def _summary_fee(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _render(spec)
    kind = _render(spec.get("kind", MISSING)) or "fee"
    parts: list[str] = []
    if kind == "fixed":
        parts = [f"fixed {_render(spec.get('amount', MISSING))}"]
        if "prorate" in spec:
            parts.append(f"pro rata to {_render(spec['prorate']).replace('_', ' ')}")
    elif kind == "percentage":
        parts = [f"percentage {_percent(spec.get('rate', MISSING))} of {_render(spec.get('basis', MISSING))}"]
    elif kind == "tiered":
        mode = _render(spec.get("mode", "graduated"))
        tiers = _as_list(spec.get("tiers", MISSING))
        bands = ", ".join(_tier_text(t) for t in tiers)
        parts = [f"tiered ({mode}) on {_render(spec.get('basis', MISSING))}: {bands}"]
    elif "steps_on" in spec:
        steps = ", ".join(_summary_step(s) for s in _as_list(spec.get("steps", MISSING)))
        parts = [f"{kind} on {_render(spec['steps_on'])}: {steps}"]
    else:
        parts = [f"{kind} when {_render(spec.get('when', MISSING))}: {_summary_payout(spec)}"]
        if "exempt_by" in spec:
            parts.append(f"exempt by {', '.join(_render(v) for v in _as_list(spec['exempt_by']))}")
    return "; ".join(parts)


def _tier_text(tier: Any) -> str:
    if not isinstance(tier, dict):
        return _render(tier)
    rate = _percent(tier.get("rate", MISSING))
    return f"{rate} up to {_render(tier['up_to'])}" if "up_to" in tier else f"{rate} above"
