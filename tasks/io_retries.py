"""Retry policy shared by the tasks that only move data: transient storage failures."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from core.storage import StorageError


def retry_on_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry transient storage failures only (not bad data, not bugs)."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StorageError | ConnectionError | TimeoutError)


def io_task(delay_s: float) -> dict[str, Any]:
    """``@task`` options: two retries of a storage failure, ``delay_s`` apart, no caching."""
    return dict(
        retries=2,
        retry_delay_seconds=delay_s,
        retry_condition_fn=retry_on_io,
        cache_policy=NO_CACHE,
    )
