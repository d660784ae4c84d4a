"""The one base class of this package's miners: a PML miner whose semi-hard/hard choice the schedule drives.

A subclass names its statistics (``STAT_NAMES``) and implements PML's ``mine``; the base holds what every
scheduled miner shares: ``semi_hard_probability`` (validated, set by ``miners.schedule``), a random generator
of its own (so every process of a distributed run draws the same, and a resumed run continues the draws: its
state travels in ``state_dict()``), and ``last_stats`` for logging.
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner

from msretrieval.utils.errors import UserError


class ScheduledMiner(BaseMiner):
    #: names of the per-call statistics (attributes set by ``mine``); ``num_triplets`` is PML's own
    STAT_NAMES: tuple[str, ...] = ()

    def __init__(self, semi_hard_probability: float, generator: torch.Generator | None = None,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if generator is not None and seed is not None:
            raise ValueError("pass either a generator or a seed, not both")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        self.generator = generator
        self.semi_hard_probability = semi_hard_probability
        self.add_to_recordable_attributes(list_of_names=[n for n in self.STAT_NAMES if n != "num_triplets"],
                                          is_stat=True)

    @property
    def semi_hard_probability(self) -> float:
        return self._semi_hard_probability

    @semi_hard_probability.setter
    def semi_hard_probability(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"semi_hard_probability must be in [0, 1], got {value}")
        self._semi_hard_probability = float(value)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (counts as int, mean squared distances as float, NaN if no triplet)."""
        return {name: getattr(self, name) for name in self.STAT_NAMES}

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
