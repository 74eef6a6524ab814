"""Self-hosted engines: servers batchrun starts on the cluster's GPUs, routes rows to,
watches, restarts and stops (docs/engines.md).

Layers inside: ``plan`` and ``routing`` are pure; ``replica`` (the actor owning one
server's process tree, via ``supervise``), ``fleet`` (the driver's side: reserve, start,
watch, stop) and ``routes`` (a worker's side: a replica per request) are the Ray shell.
"""

from batchrun.engine.plan import engine_name
from batchrun.engine.routing import ReplicaView, Router, share_of_cap

__all__ = ["ReplicaView", "Router", "engine_name", "share_of_cap"]
