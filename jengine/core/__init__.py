"""Host-side engine core: the paged KV cache manager (with prefix caching) and the iteration-level scheduler.

Pure Python; nothing here touches the device.
"""
from jengine.core.kv_cache_manager import NULL_PAGE, KVCacheManager
from jengine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput

__all__ = ["NULL_PAGE", "KVCacheManager", "ScheduledSeq", "Scheduler", "SchedulerOutput"]
