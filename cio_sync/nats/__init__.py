"""Scale-out over NATS JetStream (docs/scale-out.md): intakes publish calls to a replicated stream partitioned by
person (:class:`Publisher`), and workers consume its partitions into the sinks' bucket (:class:`Worker`).

Needs ``nats-py`` (``pip install 'cio_sync[nats]'``); importing this package without it raises MissingBackend.
"""

from cio_sync.nats._common import DEFAULT_PARTITIONS, partition_of, person_key
from cio_sync.nats.publisher import MIN_DUPLICATE_WINDOW, Publisher, PublisherStats
from cio_sync.nats.worker import Worker, WorkerStats, assign_partitions

__all__ = ["DEFAULT_PARTITIONS", "MIN_DUPLICATE_WINDOW", "Publisher", "PublisherStats", "Worker", "WorkerStats",
           "assign_partitions", "partition_of", "person_key"]
