"""Plain-language explanation of a settlement decision, in English or Simplified Chinese.

Built only from the canonical decision dict (`Decision.to_dict()`, or `json.loads` of its
canonical JSON, which is what the service stores), so a stored decision can be explained
years later without the ruleset or the engine that made it. Sentences follow the order of
the computation (SPEC §4). Every number is the exact decimal text of the decision; nothing
is ever converted to a float.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.money import ARITHMETIC, plain

LANGUAGES = ("en", "zh")

_ADJUSTMENTS = ("market_multiplier", "penalty_cap", "total_floor", "total_cap")


def explain_decision(decision: Mapping[str, Any], language: str = "en") -> list[str]:
    """Short factual sentences explaining `decision`; `language` is "en" or "zh".

    Raises ValueError for any other language.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; expected one of {', '.join(LANGUAGES)}")
    return _Explainer(decision, _EN if language == "en" else _ZH, language).sentences()


# ---------------------------------------------------------------- formatting helpers


def percent(rate: str | Decimal) -> str:
    """An exact rate as a percentage: 0.05 → "5%", 0.125 → "12.5%", 1 → "100%"."""
    value = rate if isinstance(rate, Decimal) else Decimal(rate)
    text = plain(value.scaleb(2, ARITHMETIC))
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}%"


def _label(item: Mapping[str, Any], language: str, fallback: str) -> str:
    label = item.get("label")
    if isinstance(label, Mapping):
        text = label.get(language) or label.get("en")
        if isinstance(text, str) and text:
            return text
    return fallback


def _decimal(text: Any) -> Decimal | None:
    if not isinstance(text, str):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


# ---------------------------------------------------------------- the two languages


class _Words:
    """Sentence templates of one language (fields are filled with exact decimal text)."""

    def __init__(self, **templates: str) -> None:
        self.t = templates

    def __call__(self, key: str, **values: Any) -> str:
        return self.t[key].format(**values)


_EN = _Words(
    ruleset="Ruleset {id} version {version} (content hash {hash}) was applied by engine {engine}.",
    ruleset_draft="Ruleset {id}, unversioned (content hash {hash}), was applied by engine {engine}.",
    period="Period {start} to {end} ({days} days), market {market}, settlement currency {currency}.",
    period_active="Period {start} to {end} ({days} days, {active} of them active), market {market}, settlement currency {currency}.",
    fx="{metric}: {amount} {base} converted at 1 {base} = {rate} {quote} ({source}, as of {as_of}) to {converted} {quote}.",
    exemption_applied='The exemption "{label}" applied because {evidence}.',
    exemption_not='The exemption "{label}" did not apply because {evidence} is false.',
    prorated="Targets were prorated by the factor {factor} for the exempted days.",
    prorated_params="Targets were prorated by the factor {factor} for the exempted days: {changes}.",
    params="Contract parameters used: {values}.",
    kpis="KPI values: {values}.",
    list_sep=", ",
    penalty_fired='The penalty "{label}" applied because {evidence}.',
    penalty_waived='The penalty "{label}" would have applied because {evidence}, but it was waived by {exemptions}.',
    penalty_not='The penalty "{label}" did not apply because {evidence} is false.',
    bonus_fired='The bonus "{label}" applied because {evidence}.',
    bonus_not='The bonus "{label}" did not apply because {evidence} is false.',
    step_fired='Step {step} of the bonus "{label}" was reached because {evidence}.',
    step_not='Step {step} of the bonus "{label}" was not reached because {evidence} is false.',
    rule_fired='The rule "{label}" fired because {evidence}.',
    rule_not='The rule "{label}" did not fire because {evidence} is false.',
    exemption_one='the exemption "{names}"',
    exemption_many='the exemptions "{names}"',
    exemption_join='", "',
    line="{label}: {amount} {currency}{detail}.",
    of=", {rate} of {basis} {currency}",
    graduated=", graduated tiers on {basis} {currency}",
    prorata=", {basis} {currency} × {active}/{days} active days",
    waived=", waived by {exemptions}",
    not_met=" (condition not met)",
    no_step=" (no step reached)",
    step_reached=" (step {step} reached)",
    rounded_half_up=", rounded half up from {exact}",
    rounded_half_even=", rounded half to even from {exact}",
    market_multiplier="{label}: {amount} {currency}, {rate} of {basis} {currency} (multiplier {multiplier} for market {market}).",
    penalty_cap="{label}: {amount} {currency} added back; penalties of {basis} {currency} exceed the cap of {limit} {currency}.",
    total_floor="{label}: {amount} {currency} added; the lines add up to {basis} {currency}, below the minimum of {limit} {currency}.",
    total_cap="{label}: {amount} {currency}; the lines add up to {basis} {currency}, above the maximum of {limit} {currency}.",
    adjustment="{label}: {amount} {currency}.",
    total="Total payable: {total} {currency}.",
    warning="Warning: {message} ({evidence}).",
    no_warnings="No warnings were raised.",
)

_ZH = _Words(
    ruleset="采用规则集 {id} 第{version}版（内容哈希 {hash}），引擎版本 {engine}。",
    ruleset_draft="采用规则集 {id} 未编号版本（内容哈希 {hash}），引擎版本 {engine}。",
    period="结算期 {start} 至 {end}（{days}天），市场 {market}，结算币种 {currency}。",
    period_active="结算期 {start} 至 {end}（{days}天，其中服务{active}天），市场 {market}，结算币种 {currency}。",
    fx="{metric}：{amount} {base} 按 1 {base} = {rate} {quote}（{source}，{as_of}）折算为 {converted} {quote}。",
    exemption_applied="豁免“{label}”适用，因为 {evidence}。",
    exemption_not="豁免“{label}”不适用，因为 {evidence} 不成立。",
    prorated="因豁免天数，目标按系数 {factor} 折算。",
    prorated_params="因豁免天数，目标按系数 {factor} 折算：{changes}。",
    params="所用合同参数：{values}。",
    kpis="KPI 数值：{values}。",
    list_sep="，",
    penalty_fired="罚款“{label}”适用，因为 {evidence}。",
    penalty_waived="罚款“{label}”的条件成立（{evidence}），但因{exemptions}而免除。",
    penalty_not="罚款“{label}”不适用，因为 {evidence} 不成立。",
    bonus_fired="奖金“{label}”适用，因为 {evidence}。",
    bonus_not="奖金“{label}”不适用，因为 {evidence} 不成立。",
    step_fired="奖金“{label}”第{step}档已达到，因为 {evidence}。",
    step_not="奖金“{label}”第{step}档未达到，因为 {evidence} 不成立。",
    rule_fired="规则“{label}”触发，因为 {evidence}。",
    rule_not="规则“{label}”未触发，因为 {evidence} 不成立。",
    exemption_one="豁免“{names}”",
    exemption_many="豁免“{names}”",
    exemption_join="”、“",
    line="{label}：{amount} {currency}{detail}。",
    of="，即 {basis} {currency} 的 {rate}",
    graduated="，按分段累进费率计于 {basis} {currency}",
    prorata="，即 {basis} {currency} × {active}/{days} 服务天数",
    waived="，因{exemptions}而免除",
    not_met="（条件未满足）",
    no_step="（未达到任何档位）",
    step_reached="（达到第{step}档）",
    rounded_half_up="，由 {exact} 四舍五入",
    rounded_half_even="，由 {exact} 按四舍六入五成双舍入",
    market_multiplier="{label}：{amount} {currency}，即 {basis} {currency} 的 {rate}（市场 {market} 系数 {multiplier}）。",
    penalty_cap="{label}：退回 {amount} {currency}；罚款合计 {basis} {currency} 超过上限 {limit} {currency}。",
    total_floor="{label}：补足 {amount} {currency}；各项合计 {basis} {currency}，低于最低额 {limit} {currency}。",
    total_cap="{label}：{amount} {currency}；各项合计 {basis} {currency}，超过最高额 {limit} {currency}。",
    adjustment="{label}：{amount} {currency}。",
    total="应付总额：{total} {currency}。",
    warning="预警：{message}（{evidence}）。",
    no_warnings="未触发预警。",
)


# ---------------------------------------------------------------- the explanation


class _Explainer:
    def __init__(self, decision: Mapping[str, Any], words: _Words, language: str) -> None:
        self.d = decision
        self.w = words
        self.lang = language
        self.currency: str = decision["currency"]
        self.lines: Sequence[Mapping[str, Any]] = decision.get("lines") or []
        self.rules: Sequence[Mapping[str, Any]] = decision.get("rules") or []
        self.exemption_labels = {e["name"]: _label(e, language, e["name"]) for e in decision.get("exemptions") or []}
        self.line_by_id = {ln["id"]: ln for ln in self.lines}

    def sentences(self) -> list[str]:
        out: list[str] = []
        steps: list[Callable[[list[str]], None]] = [
            self._header,
            self._fx,
            self._exemptions,
            self._proration,
            self._params_and_kpis,
            self._rules,
            self._fee_lines,
            self._adjustments,
            self._total,
            self._warnings,
        ]
        for step in steps:
            step(out)
        return out

    # -- 1. what was applied, to which period
    def _header(self, out: list[str]) -> None:
        ruleset = self.d["ruleset"]
        version = ruleset.get("version")
        key = "ruleset" if version is not None else "ruleset_draft"
        out.append(self.w(key, id=ruleset["id"], version=version, hash=ruleset["content_hash"], engine=self.d.get("engine_version", "")))
        period = self.d["period"]
        active, days = period.get("active_days", period["days"]), period["days"]
        out.append(
            self.w(
                "period" if active == days else "period_active",
                start=period["start"],
                end=period["end"],
                days=days,
                active=active,
                market=self.d["market"],
                currency=self.currency,
            )
        )

    # -- 2. currency conversions
    def _fx(self, out: list[str]) -> None:
        for fx in self.d.get("fx_rates") or []:
            out.append(self.w("fx", **{k: fx[k] for k in ("metric", "amount", "base", "rate", "quote", "source", "as_of", "converted")}))

    # -- 3. exemptions
    def _exemptions(self, out: list[str]) -> None:
        for exemption in self.d.get("exemptions") or []:
            key = "exemption_applied" if exemption["applied"] else "exemption_not"
            out.append(self.w(key, label=self.exemption_labels[exemption["name"]], evidence=exemption["evidence"]))

    # -- 4. target proration
    def _proration(self, out: list[str]) -> None:
        factor = self.d.get("target_factor", "1")
        if _decimal(factor) == Decimal(1):
            return
        given = (self.d.get("inputs") or {}).get("params") or {}
        changes = []
        for name, value in _pairs(self.d.get("params")):
            before = given.get(name)
            if isinstance(before, str) and _decimal(before) is not None and _decimal(before) != _decimal(value):
                changes.append(f"{name} {before} → {value}")
        if changes:
            out.append(self.w("prorated_params", factor=factor, changes=self.w.t["list_sep"].join(changes)))
        else:
            out.append(self.w("prorated", factor=factor))

    # -- 5. contract parameters and KPI values
    def _params_and_kpis(self, out: list[str]) -> None:
        sep = self.w.t["list_sep"]
        # in the order the ruleset declares params and computes KPIs
        params = _pairs(self.d.get("params"))
        if params:
            out.append(self.w("params", values=sep.join(f"{name} = {value}" for name, value in params)))
        kpis = _pairs(self.d.get("kpis"))
        if kpis:
            out.append(self.w("kpis", values=sep.join(f"{name} = {value}" for name, value in kpis)))

    # -- 6. every rule, fired or not (warnings are told at the end)
    def _rules(self, out: list[str]) -> None:
        for rule in self.rules:
            kind, name, fired, evidence = rule["kind"], rule["rule"], rule["fired"], rule["evidence"]
            if kind == "warning":
                continue
            if kind == "bonus_step":
                fee_id, step = _step_of(name)
                label = self._line_label(fee_id)
                out.append(self.w("step_fired" if fired else "step_not", label=label, step=step, evidence=evidence))
                continue
            label = self._line_label(name)
            if kind == "penalty":
                waived = (self.line_by_id.get(name) or {}).get("waived_by") or []
                if fired and waived:
                    out.append(self.w("penalty_waived", label=label, evidence=evidence, exemptions=self._exemption_names(waived)))
                else:
                    out.append(self.w("penalty_fired" if fired else "penalty_not", label=label, evidence=evidence))
            elif kind == "bonus":
                out.append(self.w("bonus_fired" if fired else "bonus_not", label=label, evidence=evidence))
            else:
                out.append(self.w("rule_fired" if fired else "rule_not", label=label, evidence=evidence))

    # -- 7. fee lines
    def _fee_lines(self, out: list[str]) -> None:
        for line in self.lines:
            if line["kind"] != "adjustment":
                out.append(
                    self.w(
                        "line", label=self._line_label(line["id"]), amount=line["amount"], currency=self.currency, detail=self._detail(line)
                    )
                )

    def _detail(self, line: Mapping[str, Any]) -> str:
        w, kind, basis, rate = self.w, line["kind"], line.get("basis"), line.get("rate")
        waived = line.get("waived_by") or []
        parts: list[str] = []
        if waived:
            parts.append(w("waived", exemptions=self._exemption_names(waived)))
        elif kind == "fixed" and basis is not None and rate is not None:
            period = self.d["period"]
            parts.append(
                w("prorata", basis=basis, currency=self.currency, active=period.get("active_days", period["days"]), days=period["days"])
            )
        elif basis is not None and rate is not None:
            parts.append(w("of", rate=percent(rate), basis=basis, currency=self.currency))
        elif kind == "tiered" and basis is not None:
            parts.append(w("graduated", basis=basis, currency=self.currency))
        exact, amount = _decimal(line.get("exact")), _decimal(line.get("amount"))
        if not waived and exact is not None and amount is not None and exact != amount:
            mode = "rounded_half_even" if self.d.get("rounding") == "half_even" else "rounded_half_up"
            parts.append(w(mode, exact=line["exact"]))
        if not waived:
            parts.append(self._outcome(line))
        return "".join(parts)

    def _outcome(self, line: Mapping[str, Any]) -> str:
        """Why a bonus or penalty line is what it is: the step reached, or a condition not met."""
        line_id = line["id"]
        steps = [r for r in self.rules if r["kind"] == "bonus_step" and _step_of(r["rule"])[0] == line_id]
        if steps:
            reached = [_step_of(r["rule"])[1] for r in steps if r["fired"]]
            return self.w("step_reached", step=max(reached)) if reached else self.w.t["no_step"]
        for rule in self.rules:
            if rule["rule"] == line_id and rule["kind"] in ("bonus", "penalty") and not rule["fired"]:
                return self.w.t["not_met"]
        return ""

    # -- 8 and 9. market multiplier, penalty cap, floor and cap on the total
    def _adjustments(self, out: list[str]) -> None:
        for line in self.lines:
            if line["kind"] != "adjustment":
                continue
            line_id = line["id"]
            label = _label(line, self.lang, line_id)
            amount, basis, rate = line["amount"], line.get("basis"), line.get("rate")
            if line_id == "market_multiplier" and basis is not None and rate is not None:
                multiplier = plain(ARITHMETIC.add(Decimal(1), Decimal(rate)))
                out.append(
                    self.w(
                        "market_multiplier",
                        label=label,
                        amount=amount,
                        currency=self.currency,
                        rate=percent(rate),
                        basis=basis,
                        multiplier=multiplier,
                        market=self.d["market"],
                    )
                )
            elif line_id in _ADJUSTMENTS and basis is not None:
                before, change = Decimal(basis), Decimal(amount)
                limit = ARITHMETIC.subtract(before, change) if line_id == "penalty_cap" else ARITHMETIC.add(before, change)
                out.append(self.w(line_id, label=label, amount=amount, currency=self.currency, basis=basis, limit=plain(limit)))
            else:
                out.append(self.w("adjustment", label=label, amount=amount, currency=self.currency))

    # -- 10. the total
    def _total(self, out: list[str]) -> None:
        out.append(self.w("total", total=self.d["total"], currency=self.currency))

    # -- 11. warnings
    def _warnings(self, out: list[str]) -> None:
        warnings = self.d.get("warnings") or []
        for warning in warnings:
            message = warning.get("message")
            text = warning["id"]
            if isinstance(message, Mapping):
                text = message.get(self.lang) or message.get("en") or text
            out.append(self.w("warning", message=text, evidence=warning["evidence"]))
        if not warnings:
            out.append(self.w.t["no_warnings"])

    # -- helpers
    def _line_label(self, line_id: str) -> str:
        line = self.line_by_id.get(line_id)
        return _label(line, self.lang, line_id) if line is not None else line_id

    def _exemption_names(self, names: Sequence[str]) -> str:
        labels = [self.exemption_labels.get(n, n) for n in names]
        key = "exemption_one" if len(labels) == 1 else "exemption_many"
        return self.w(key, names=self.w.t["exemption_join"].join(labels))


def _pairs(entries: Any) -> list[tuple[str, str]]:
    """[{"name", "value"}…] as (name, value) pairs, in order."""
    return [(str(e["name"]), str(e["value"])) for e in entries or []]


def _step_of(rule: str) -> tuple[str, int]:
    """`gmv_bonus.steps[1]` → ("gmv_bonus", 2): the fee id and the 1-based step number."""
    fee_id, _, rest = rule.partition(".steps[")
    try:
        return fee_id, int(rest.rstrip("]")) + 1
    except ValueError:
        return fee_id, 0
