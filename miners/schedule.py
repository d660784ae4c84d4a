"""Step-keyed phases of triplet mining, so training can move from semi-hard to mixed to hard mining.

``semi_hard_probability`` drives both Algorithm 1 and the in-batch miner; ``hard_threshold`` (Algorithm 1's
case C: a hard positive at least t ranks after the first negative is dropped) and ``refresh_every`` (how
often Algorithm 1 re-mines) apply to Algorithm 1 only.

Built from the plain list/dict a YAML config gives, e.g.::

    refresh_every: 8
    phases:
      - {until_step: 200, semi_hard_probability: 1.0, hard_threshold: null}
      - {until_step: 600, semi_hard_probability: 0.5, hard_threshold: 64}
      - {semi_hard_probability: 0.0, hard_threshold: 64}

A phase applies while ``step < until_step``; only the last phase may leave ``until_step`` out, and steps past
the last ``until_step`` keep the last phase. A phase may set its own ``refresh_every``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from msretrieval.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningPhase:
    semi_hard_probability: float
    hard_threshold: int | None = None
    until_step: int | None = None
    refresh_every: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.semi_hard_probability <= 1.0:
            raise UserError(f"semi_hard_probability must be in [0, 1], got {self.semi_hard_probability}")
        if self.hard_threshold is not None and self.hard_threshold < 1:
            raise UserError(f"hard_threshold must be >= 1 or null, got {self.hard_threshold}")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise UserError(f"refresh_every must be >= 1, got {self.refresh_every}")

    @classmethod
    def from_config(cls, config: dict[str, Any] | MiningPhase) -> MiningPhase:
        if isinstance(config, MiningPhase):
            return config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise UserError(f"unknown mining phase key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**config)


@dataclass(frozen=True)
class MiningSchedule:
    phases: tuple[MiningPhase, ...]
    refresh_every: int = 8

    def __post_init__(self):
        phases = tuple(MiningPhase.from_config(phase) for phase in self.phases)
        if not phases:
            raise UserError("a mining schedule needs at least one phase")
        if any(phase.until_step is None for phase in phases[:-1]):
            raise UserError("only the last mining phase may omit until_step")
        boundaries = tuple(phase.until_step for phase in phases if phase.until_step is not None)
        if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
            raise UserError(f"until_step must increase from phase to phase, got {list(boundaries)}")
        if self.refresh_every < 1:
            raise UserError(f"refresh_every must be >= 1, got {self.refresh_every}")
        object.__setattr__(self, "phases", phases)

    @classmethod
    def from_config(cls, config: list | dict) -> MiningSchedule:
        """A list of phases, or ``{"phases": [...], "refresh_every": 8}``."""
        if isinstance(config, list):
            return cls(phases=tuple(config))
        unknown = set(config) - {"phases", "refresh_every"}
        if unknown:
            raise UserError(f"unknown mining schedule key(s) {sorted(unknown)}; expected phases, refresh_every")
        return cls(phases=tuple(config["phases"]), refresh_every=config.get("refresh_every", 8))

    def phase_at(self, step: int) -> MiningPhase:
        for phase in self.phases:
            if phase.until_step is None or step < phase.until_step:
                return phase
        return self.phases[-1]

    def refresh_every_at(self, step: int) -> int:
        phase = self.phase_at(step)
        return self.refresh_every if phase.refresh_every is None else phase.refresh_every

    def apply(self, miner, step: int, pool=None) -> MiningPhase:
        """Set the miner's semi-hard probability (and, for Algorithm 1, its threshold; for a pool, its refresh
        period) for ``step``."""
        phase = self.phase_at(step)
        has_threshold = hasattr(miner, "hard_threshold")
        before = (miner.semi_hard_probability, getattr(miner, "hard_threshold", None))
        miner.semi_hard_probability = phase.semi_hard_probability
        if has_threshold:
            miner.hard_threshold = phase.hard_threshold
        if pool is not None:
            pool.refresh_every = self.refresh_every_at(step)
        if before != (miner.semi_hard_probability, getattr(miner, "hard_threshold", None)):
            logger.info("step %d: mining with semi_hard_probability=%.2f%s", step, phase.semi_hard_probability,
                        f", hard_threshold={phase.hard_threshold}" if has_threshold else "")
        return phase
