"""Guard rules: what the server does when a reading crosses a threshold.

- `TRAIT>X:flag`    annotate the answer when the pre-answer reading is above X;
- `TRAIT>X:steer=C` when the pre-answer reading is above X, steer the answer (response tokens) with the trait's
                    vector at coefficient C (the request's coef_mode) -- decided after the prefill, before decoding;
- `TRAIT:cap=X`     activation capping: while decoding, the component along the unit vector at the trait's layer
                    is clamped to at most X.

Readings are raw projections at the vector's layer (the unit the `monitor` command prints).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import PersonavecError

_RULE = re.compile(r"^\s*(?P<trait>[A-Za-z0-9_.-]+)\s*(?:>\s*(?P<threshold>[^:]+))?\s*:\s*(?P<action>flag|steer|cap)"
                   r"(?:\s*=\s*(?P<value>.+))?\s*$")


@dataclass(frozen=True)
class Guard:
    trait: str
    action: str  # flag | steer | cap
    threshold: float | None = None  # for flag and steer
    value: float | None = None  # the coefficient (steer) or the cap (cap)

    def __str__(self) -> str:
        if self.action == "cap":
            return f"{self.trait}:cap={self.value:g}"
        suffix = f"={self.value:g}" if self.action == "steer" else ""
        return f"{self.trait}>{self.threshold:g}:{self.action}{suffix}"

    def fires(self, reading: float) -> bool:
        return self.threshold is not None and reading > self.threshold


def _number(text: str, rule: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PersonavecError(f"guard {rule!r}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise PersonavecError(f"guard {rule!r}: {what} must be finite")
    return value


def parse_guard(rule: str) -> Guard:
    """`TRAIT>X:flag`, `TRAIT>X:steer=C` or `TRAIT:cap=X`; a clear error names the rule otherwise."""
    match = _RULE.match(rule or "")
    if not match:
        raise PersonavecError(f"guard {rule!r}: use TRAIT>X:flag, TRAIT>X:steer=C or TRAIT:cap=X")
    trait, action = match["trait"], match["action"]
    threshold = None if match["threshold"] is None else _number(match["threshold"], rule, "threshold")
    value = None if match["value"] is None else _number(match["value"], rule, "value")
    if action == "cap":
        if threshold is not None or value is None:
            raise PersonavecError(f"guard {rule!r}: a cap is written TRAIT:cap=X")
    elif threshold is None:
        raise PersonavecError(f"guard {rule!r}: {action} needs a threshold, e.g. {trait}>2.5:{action}")
    if action == "steer" and value is None:
        raise PersonavecError(f"guard {rule!r}: steer needs a coefficient, e.g. {trait}>2.5:steer=-0.5")
    if action == "flag" and value is not None:
        raise PersonavecError(f"guard {rule!r}: flag takes no value")
    return Guard(trait=trait, action=action, threshold=threshold, value=value)
