"""What a diagnosis says: findings with evidence, ranked causes and remedies, in a report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "error")


def json_ready(value: Any) -> Any:
    """Plain JSON types only: numpy scalars become Python numbers, inf/NaN become strings."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def layer_names(names: list[str], shown: int = 4, start: bool = False) -> str:
    """Layers named in a sentence: Sequential's names are bare numbers, so say "layer".

    Example:
        >>> layer_names(["0"]), layer_names(["0", "2"], start=True), layer_names(list("abcdefg"))
        ('layer 0', 'Layers 0 and 2', 'layers a, b, c, d and 3 more')
    """
    word = "Layer" if start else "layer"
    if len(names) == 1:
        return f"{word} {names[0]}"
    if len(names) <= shown:
        return f"{word}s {', '.join(names[:-1])} and {names[-1]}"
    return f"{word}s {', '.join(names[:shown])} and {len(names) - shown} more"


def agree(names: list[str], one: str, many: str) -> str:
    """The word that agrees with a list of layers: ``one`` for a single layer, else ``many``.

    Example:
        >>> agree(["0"], "learns", "learn"), agree(["0", "2"], "its", "their")
        ('learns', 'their')
    """
    return one if len(names) == 1 else many


@dataclass(frozen=True)
class Remedy:
    """A fix: a stable id, one sentence, and a snippet using torch's own API."""

    id: str
    text: str
    code: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "text": self.text, "code": self.code}


@dataclass
class Cause:
    """A likely reason for a finding, with the numbers behind it. Higher score ranks first."""

    id: str
    text: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finding:
    """One pathology: what, where, since when, why, and what to change.

    Attributes:
        kind: one of vanishing_gradient, exploding_gradient, nonfinite, dead_units,
            saturation, update_ratio, loss_plateau, loss_divergence, unmeasured.
        severity: "error" when training is harmed, "warning" when the pathology is
            clear but harm is not shown yet, "info" otherwise.
        layers: module names, the most affected first.
        summary: one sentence in words.
    """

    kind: str
    severity: str
    layers: list[str]
    first_step: int | None
    last_step: int | None
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    causes: list[Cause] = field(default_factory=list)
    remedies: list[Remedy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}; got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layers": list(self.layers),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "summary": self.summary,
            "evidence": self.evidence,
            "causes": [c.text for c in self.causes],
            "cause_ids": [c.id for c in self.causes],
            "remedies": [r.to_dict() for r in self.remedies],
        }


@dataclass
class Report:
    """The diagnosis of one run.

    Example:
        >>> Report(findings=[], run={"steps": 10, "layers": 3}).to_dict()["healthy"]
        True
    """

    findings: list[Finding]
    run: dict[str, Any]

    @property
    def healthy(self) -> bool:
        """True when no finding is a warning or an error."""
        return not any(f.severity in ("warning", "error") for f in self.findings)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return json_ready(
            {
                "healthy": self.healthy,
                "findings": [f.to_dict() for f in self.findings],
                "run": self.run,
            }
        )

    def __rich__(self):
        from ..report.terminal import render_report

        return render_report(self)
