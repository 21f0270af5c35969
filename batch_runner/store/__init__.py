"""The run database: schema, engine set-up and the job repository."""

from batch_runner.store.records import (
    AttemptRecord,
    EndpointRecord,
    IngestReport,
    JobRecord,
    NewJob,
    OutputRecord,
    RunRecord,
)
from batch_runner.store.repository import Failure, Store

__all__ = [
    "AttemptRecord",
    "EndpointRecord",
    "Failure",
    "IngestReport",
    "JobRecord",
    "NewJob",
    "OutputRecord",
    "RunRecord",
    "Store",
]
