"""Host-side engine core: the paged KV cache manager (with prefix caching), the iteration-level scheduler
and the request registry (the one place a request ends).

Pure Python; nothing here touches the device.
"""
from jengine.core.kv_cache_manager import NULL_PAGE, KVCacheManager
from jengine.core.registry import RequestRegistry
from jengine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput

__all__ = ["NULL_PAGE", "KVCacheManager", "RequestRegistry", "ScheduledSeq", "Scheduler", "SchedulerOutput"]
