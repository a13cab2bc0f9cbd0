"""An accuracy budget (``1pt``, ``3%ppl``, ``30dB``) and its metric on rows the choice is judged on.

A :class:`Budget` says how far the quantized model may be from float:

- ``<x>pt``: accuracy points lost vs float on labelled rows; on unlabelled rows (label ``-1``),
  points of top-1 disagreement with the float model (``100 * (1 - agreement)``);
- ``<x>%ppl``: relative perplexity increase in percent (causal language models: next-token
  cross-entropy over the ``input_ids`` of the real positions);
- ``<x>dB``: model output SQNR vs float over all floating output leaves.

:class:`~slimformer.quantize.judge.Judge` measures them on rows the choice is judged on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimformer.errors import ConfigError

FORMS = ("<points>pt (accuracy points lost vs float, or top-1 agreement points on unlabelled "
         "rows; e.g. 1pt), <percent>%ppl (relative perplexity increase, causal LMs; e.g. 3%ppl), "
         "<dB>dB (model output SQNR vs float; e.g. 30dB)")
_FORM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(pt|%ppl|db)\s*$", re.IGNORECASE)
UNITS = {"pt": "pt", "%ppl": "ppl", "db": "db"}
# judge rows per metric (forwards are cheap; a point of accuracy needs hundreds of rows)
ROWS = {"db": 32, "pt": 512, "ppl": 64}


@dataclass(frozen=True)
class Budget:
    """How far from float the quantized model may be.

    Attributes:
        kind: ``pt`` (points lost), ``ppl`` (relative perplexity increase, %) or ``db``
            (output SQNR floor).
        value: The bound (points / percent: at most; dB: at least).
    """

    kind: str
    value: float

    def __str__(self) -> str:
        v = f"{self.value:g}"
        return {"pt": f"{v}pt", "ppl": f"{v}%ppl", "db": f"{v}dB"}[self.kind]

    def met(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` (of :meth:`~slimformer.quantize.judge.Judge.measure`) are within it."""
        got = metrics[self.kind]
        return got >= self.value if self.kind == "db" else got <= self.value

    def describe(self, metrics: dict[str, float]) -> str:
        """The budget's metric in words, e.g. ``0.8 points lost (labelled rows)``."""
        got = metrics[self.kind]
        if self.kind == "db":
            return f"output SQNR {got:.1f} dB"
        if self.kind == "ppl":
            return f"perplexity +{got:.2f}%"
        what = "accuracy" if metrics.get("labelled") else "top-1 agreement"
        return f"{got:.2f} {what} points lost"


def parse_budget(text: str) -> Budget:
    """``"1pt"`` / ``"3%ppl"`` / ``"30dB"`` -> :class:`Budget`.

    Raises:
        ConfigError: Any other form (the allowed forms listed), or a value out of range.
    """
    m = _FORM.match(str(text))
    if not m:
        raise ConfigError([f"budget: {text!r} is not a budget; allowed forms: {FORMS}"],
                          "quantize config")
    value, kind = float(m.group(1)), UNITS[m.group(2).lower()]
    if kind != "db" and not 0 <= value < 100:
        raise ConfigError([f"budget: {text!r}: {kind} budgets are 0 to under 100 "
                           f"({'points' if kind == 'pt' else 'percent'})"], "quantize config")
    if kind == "db" and not 0 < value <= 200:
        raise ConfigError([f"budget: {text!r}: dB budgets are over 0 and at most 200"],
                          "quantize config")
    return Budget(kind, value)


def budget_field(v: str | None) -> str | None:
    """Pydantic validator of ``QuantConfig.budget``: checked, normalized (``1pt``)."""
    if v is None:
        return None
    try:
        return str(parse_budget(v))
    except ConfigError as e:
        raise ValueError(e.problems[0].removeprefix("budget: ")) from None
