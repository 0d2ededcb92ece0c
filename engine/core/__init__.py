"""The engine core: scheduler and KV-cache block manager. Pure Python (no torch)."""

from __future__ import annotations

from engine.core.block_manager import BlockManager
from engine.core.scheduler import ScheduledRequest, Scheduler, SchedulerOutput, SchedulerStats

__all__ = ["BlockManager", "ScheduledRequest", "Scheduler", "SchedulerOutput", "SchedulerStats"]
