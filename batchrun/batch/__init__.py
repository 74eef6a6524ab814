"""Batch mode: the job through a provider's Batch API (half price, answers within a window).

``run_batch_job`` drives it; ``batch_status`` and ``cancel_batches`` serve
``batchrun status`` and ``batchrun stop``; ``refuse_open_batches`` keeps online mode from
sending rows an open batch will also answer. Modules, in the order data flows:
``requests`` (rows -> JSONL chunks), ``plan`` (which rows: those without a result),
``state`` (the chunk state file), ``provider`` (the Files/Batch API client, retries),
``collect`` (output lines -> result records), ``run`` (the driver loop).
"""

from batchrun.batch.run import BatchOutcome, batch_status, cancel_batches, run_batch_job
from batchrun.batch.state import refuse_open_batches

__all__ = ["BatchOutcome", "batch_status", "cancel_batches", "refuse_open_batches",
           "run_batch_job"]
