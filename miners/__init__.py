"""Triplet mining: Algorithm 1 (mining batch, semi-hard/hard, refreshed pool) and in-batch semi-hard/hard."""
from .base import ScheduledMiner
from .algorithm1 import STAT_NAMES, Algorithm1Miner, squared_euclidean
from .batch import BatchTripletMiner
from .factory import MINER_NAMES, create_miner, follows_schedule
from .pool import MiningPool
from .schedule import MiningPhase, MiningSchedule

__all__ = ["Algorithm1Miner", "BatchTripletMiner", "MINER_NAMES", "MiningPhase", "MiningPool", "MiningSchedule",
           "STAT_NAMES", "ScheduledMiner", "create_miner", "follows_schedule", "squared_euclidean"]
