"""Short-interval poller: one Prefect event per newly dropped pair list.

S3 event notifications would need AWS EventBridge; this flow gets the same effect with
only Prefect. Each run lists ``incoming/``, and for every list version that is neither
processed (ledger) nor announced yet, creates ``events/announced/<key>/<etag>.json`` with
``put_if_absent`` and, only when that create succeeded, emits::

    event    facereid.pair-list.dropped
    resource facereid.pair-list.<list key>   (+ facereid.list-key, facereid.etag labels)
    payload  {"list_key": ..., "etag": ..., "size": ..., "storage_uri": ...}

The conditional create makes the announcement at-most-once even with overlapping polls;
an event lost in transit is covered by the nightly ``verify_pairs`` run, which does not
depend on events. The automation in prefect.yaml runs ``verify_pairs`` with the list key
taken from the resource id and ``storage_uri`` from the payload.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from core.ledger import mark_announced, pending_lists
from core.settings import get_settings
from core.storage import storage_from_uri

EVENT_NAME = "facereid.pair-list.dropped"
RESOURCE_PREFIX = "facereid.pair-list."


def resource_id(list_key: str) -> str:
    return f"{RESOURCE_PREFIX}{list_key}"


@task(name="announce_new_lists", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def announce_new_lists(storage: Any, max_events: int = 100) -> list[dict[str, Any]]:
    from prefect.events import emit_event

    announced: list[dict[str, Any]] = []
    for info in pending_lists(storage):
        if len(announced) >= max_events:
            break  # the rest are announced by the next poll
        if not mark_announced(storage, info.key, info.etag):
            continue
        payload = {
            "list_key": info.key,
            "etag": info.etag,
            "size": info.size,
            "storage_uri": storage.uri,
        }
        event = emit_event(
            EVENT_NAME,
            resource={
                "prefect.resource.id": resource_id(info.key),
                "prefect.resource.name": info.key.rsplit("/", 1)[-1],
                "facereid.list-key": info.key,
                "facereid.etag": info.etag,
            },
            payload=payload,
        )
        announced.append({**payload, "event_id": str(event.id) if event else None})
    return announced


@flow(name="poll_incoming", log_prints=True)
def poll_incoming(storage_uri: str | None = None, max_events: int = 100) -> dict[str, Any]:
    """Emit ``facereid.pair-list.dropped`` once per new list version under incoming/.

    Args:
      storage_uri: override settings.storage_uri (file://... or s3://bucket/prefix).
      max_events: most events one poll emits; the rest wait for the next poll.
    """
    settings = get_settings()
    storage = storage_from_uri(
        storage_uri or settings.storage_uri,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    announced = announce_new_lists(storage, max_events)
    get_run_logger().info("announced %d new pair list(s)", len(announced))
    return {"announced": announced}


if __name__ == "__main__":
    print(poll_incoming())
