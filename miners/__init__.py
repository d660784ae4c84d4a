"""Triplet mining: Algorithm 1 (mining batch, semi-hard/hard, refreshed pool) and PML in-batch miners."""
from .algorithm1 import STAT_NAMES, Algorithm1Miner, squared_euclidean
from .online import ONLINE_MINERS, create_online_miner
from .pool import MiningPool
from .schedule import MiningPhase, MiningSchedule

__all__ = ["Algorithm1Miner", "MiningPhase", "MiningPool", "MiningSchedule", "ONLINE_MINERS", "STAT_NAMES",
           "create_online_miner", "squared_euclidean"]
