"""What an evaluation reports, whichever runtime computed it (torch or lean)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    examples: int
