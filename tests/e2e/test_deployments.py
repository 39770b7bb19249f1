"""prefect.yaml deployed on a real Prefect server and run by a real process worker.

Everything here is the real thing: ``prefect server start``, ``prefect deploy --all`` from
the checkout, ``prefect worker start`` as a subprocess, and S3 on the moto server.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import Event

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import WORK_POOL, PrefectServer
from tests.e2e.processes import PREFECT, start, stop_tree, tail
from tests.fake_lfw import build_fake_lfw

pytestmark = pytest.mark.e2e

# deployment name -> flow name (the flows' @flow(name=...))
EXPECTED = {
    "ingest-lfw": "ingest-lfw",
    "retrain-models": "retrain",
    "verify-pairs-nightly": "verify_pairs",
    "verify-pairs-on-drop": "verify_pairs",
    "poll-incoming": "poll_incoming",
}
RUN_TIMEOUT_S = 600  # a hung run fails the test instead of hanging CI


def deployments_by_name(client: SyncPrefectClient) -> dict[str, Any]:
    return {d.name: d for d in client.read_deployments() if d.name in EXPECTED}


def flow_runs_of(
    client: SyncPrefectClient, deployment_id: UUID, *states: StateType
) -> list[FlowRun]:
    state_filter = FlowRunFilter(state={"type": FlowRunFilterStateType(any_=list(states))})
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=state_filter if states else None,
    )


def wait_for_final_state(client: SyncPrefectClient, run_id: UUID, timeout: float) -> FlowRun:
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            return run
        time.sleep(1)


def test_prefect_yaml_deploys_every_deployment_with_schedules(deployed: PrefectServer) -> None:
    with SyncPrefectClient(deployed.api_url) as client:
        found = deployments_by_name(client)
        assert set(found) == set(EXPECTED)
        for name, deployment in found.items():
            flow = client.read_flow(deployment.flow_id)
            assert flow.name == EXPECTED[name]
            assert deployment.work_pool_name == WORK_POOL
            # flow runs start in this checkout, whatever the worker's cwd
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
            ]

    def crons(name: str) -> list[tuple[str, str]]:
        return [(s.schedule.cron, s.schedule.timezone) for s in found[name].schedules if s.active]

    assert crons("retrain-models") == [("0 3 * * 0", "UTC")]
    assert crons("verify-pairs-nightly") == [("0 2 * * *", "UTC")]
    assert [s.schedule.interval for s in found["poll-incoming"].schedules] == [
        timedelta(seconds=300)
    ]
    assert found["ingest-lfw"].schedules == []
    assert found["verify-pairs-on-drop"].schedules == []
    # the run form: every parameter described in the schema the UI renders
    ingest_params = found["ingest-lfw"].parameter_openapi_schema["properties"]
    assert {"data_home", "download_if_missing"} <= set(ingest_params)
    verify_params = found["verify-pairs-nightly"].parameter_openapi_schema["properties"]
    assert {"list_key", "precision"} <= set(verify_params)
    undescribed = [
        (name, param)
        for name, deployment in found.items()
        for param, spec in deployment.parameter_openapi_schema["properties"].items()
        if not spec.get("description")
    ]
    assert undescribed == []
    check_weekly_siamese_recipe(found["retrain-models"].parameters)


def check_weekly_siamese_recipe(deployed: dict[str, Any]) -> None:
    """The weekly retrain trains the Siamese net as the README's View 2 figure was measured
    (45 epochs, bfloat16): the deployed parameters, completed by the flow's defaults, go
    through the flow's own flag builder and the entry point's parser."""
    from flows.retrain import check_run_parameters, hyperparameters_for, retrain
    from models.train_siamese import make_config, parse_args
    from tasks.backends import hyperparameters_to_cli_args

    defaults = {n: p.default for n, p in inspect.signature(retrain.fn).parameters.items()}
    params = defaults | deployed
    check_run_parameters(params["eval_pairs"], params["extra_hyperparameters"])
    flags = hyperparameters_for(
        "siamese",
        run_view2="siamese" in params["view2_models"],
        eval_pairs=params["eval_pairs"],
        seed=params["seed"],
        pca_components=params["pca_components"],
        siamese_epochs=params["siamese_epochs"],
        siamese_max_train_seconds=params["siamese_max_train_seconds"],
        siamese_mixed_precision=params["siamese_mixed_precision"],
        extra=(params["extra_hyperparameters"] or {}).get("siamese"),
    )
    config = make_config(parse_args(hyperparameters_to_cli_args(flags)), (68, 56))
    assert (config.epochs, config.mixed_precision) == (45, True)
    # the cap leaves room: 45 epochs took 2,500-3,100 s per View 2 fold on 2 cores
    assert config.max_train_seconds is not None and config.max_train_seconds >= 2 * 3100


def drop_event(list_key: str, **payload: str) -> Event:
    """The event poll_incoming emits for a new pair list, named by poll_incoming's own
    constants: a renamed event or resource that prefect.yaml's trigger no longer matches
    fails this test."""
    from flows.poll_incoming import EVENT_NAME, resource_id

    return Event(
        event=EVENT_NAME,
        resource={"prefect.resource.id": resource_id(list_key)},
        payload={"list_key": list_key, **payload},
    )


def test_pair_list_drop_events_start_verify_for_each_list(deployed: PrefectServer) -> None:
    """The trigger on verify-pairs-on-drop turns each drop event into a run for its list.

    An event without ``storage_uri`` in its payload (e.g. emitted by hand) gets
    storage_uri=None, which verify_pairs reads as "the worker's settings".
    """
    tag = uuid.uuid4().hex[:8]
    expected = {
        f"incoming/e2e-{tag}.csv": "s3://bucket/root",
        f"incoming/sub dir/e2e-{tag}.v2.parquet": None,
    }
    events = [
        drop_event(f"incoming/e2e-{tag}.csv", etag="e1", storage_uri="s3://bucket/root"),
        drop_event(f"incoming/sub dir/e2e-{tag}.v2.parquet", etag="e2"),
    ]
    with SyncPrefectClient(deployed.api_url) as client:
        on_drop = deployments_by_name(client)["verify-pairs-on-drop"]
        response = httpx.post(
            f"{deployed.api_url}/events",
            json=[e.model_dump(mode="json") for e in events],
            timeout=10,
        )
        assert response.status_code == 204, response.text
        triggered: list[FlowRun] = []
        deadline = time.monotonic() + 120
        while len(triggered) < len(expected) and time.monotonic() < deadline:
            time.sleep(1)
            triggered = [
                r
                for r in flow_runs_of(client, on_drop.id)
                if r.parameters.get("list_key") in expected
            ]
        try:
            got = {r.parameters["list_key"]: r.parameters["storage_uri"] for r in triggered}
            assert len(triggered) == len(expected), "one verify run per dropped list"
            assert got == expected
            assert all(set(r.parameters) == {"list_key", "storage_uri"} for r in triggered)
        finally:
            for run in triggered:  # nobody should ever execute them
                client.delete_flow_run(run.id)


def quiet_other_deployments(client: SyncPrefectClient) -> None:
    """Pause the scheduled deployments and drop every pending run but ingest-lfw's.

    Only the run this test starts may reach the worker (poll-incoming is scheduled every
    five minutes, starting now).
    """
    for name, deployment in deployments_by_name(client).items():
        if name == "ingest-lfw":
            continue
        if deployment.schedules:
            client.pause_deployment(deployment.id)
        for run in flow_runs_of(
            client, deployment.id, StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING
        ):
            client.delete_flow_run(run.id)


@pytest.mark.slow
def test_ingest_lfw_deployment_runs_on_a_worker_into_s3(
    deployed: PrefectServer, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    fake = build_fake_lfw(tmp_path / "lfw", n_people=20, max_images=3, pairs_per_fold=1)
    worker_log = deployed.logs / f"worker-{tmp_path.name}.log"
    worker_env = deployed.env(
        FACEREID_STORAGE_URI=f"s3://{s3_bucket}/root",
        FACEREID_S3_ENDPOINT_URL=moto_endpoint,
        FACEREID_CACHE_DIR=str(tmp_path / "cache"),
        FACEREID_BACKEND="local",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    with SyncPrefectClient(deployed.api_url) as client:
        ingest = deployments_by_name(client)["ingest-lfw"]
        quiet_other_deployments(client)
        run = client.create_flow_run_from_deployment(
            ingest.id, parameters={"data_home": str(fake.data_home)}
        )
        worker = start(
            [PREFECT, "worker", "start", "--pool", WORK_POOL, "--name", f"e2e-{tmp_path.name}"],
            worker_env,
            worker_log,
            cwd=tmp_path,  # not the checkout: the deployment's pull step must get us there
        )
        try:
            final = wait_for_final_state(client, run.id, RUN_TIMEOUT_S)
        finally:
            stop_tree(worker)
    assert final.state is not None
    assert final.state.type == StateType.COMPLETED, (
        f"flow run ended {final.state.type}: {final.state.message}\n{tail(worker_log)}"
    )

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")

    def read_json(key: str) -> dict[str, Any]:
        return json.loads(s3.get_object(Bucket=s3_bucket, Key=f"root/{key}")["Body"].read())

    latest = read_json("datasets/lfw/latest.json")
    assert latest["prefix"] == f"datasets/lfw/v={latest['version']}/"
    manifest = read_json(f"{latest['prefix']}manifest.json")
    assert manifest["version"] == latest["version"]
    assert manifest["counts"]["images"] == fake.n_images
    assert manifest["counts"]["people"] == len(fake.people)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"root/{latest['prefix']}faces/")
    assert [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".parquet")]
