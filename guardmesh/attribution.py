"""How one feature's attributions moved between a reference and a live window: the figures the scorer's
attribution-drift monitor computes (``services/scorer/explain.py``) and the SDK reads back from the wire.

All values are in the attributions' units (score units), so they compare across features.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributionChange:
    """One feature's mean attributions in both windows and their changes."""

    #: Mean |attribution| over the reference window: how much the feature mattered, in either direction.
    reference_mean_abs: float
    #: Mean signed attribution over the reference window: how much it pushed the score up (or down).
    reference_mean: float
    live_mean_abs: float
    live_mean: float
    #: ``live_mean_abs - reference_mean_abs``: the feature gained (+) or lost (-) importance.
    change_mean_abs: float
    #: ``live_mean - reference_mean``: this feature's share of the change of the mean score.
    change_mean: float

    @property
    def shift(self) -> float:
        """The ranking key: ``max(|change_mean|, |change_mean_abs|)``.

        The signed change catches a feature that now pushes the score the other way (its importance may
        be unchanged); the |attribution| change catches one whose pushes grew in both directions (its
        signed mean may be unchanged).
        """
        return max(abs(self.change_mean), abs(self.change_mean_abs))
