"""What every SageMaker call of facereid shares: sessions, image URIs, S3 URIs.

The ``sagemaker`` SDK (v3) is an optional extra, so it is imported inside functions only.
Endpoints are explicit: ``endpoints={"s3": ..., "sagemaker": ...}`` routes those services
to e.g. a moto server; services not named use botocore's normal resolution (which also
honours ``AWS_ENDPOINT_URL_SAGEMAKER``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import boto3

# The newest TensorFlow with both a SageMaker *training* image (2.19, py312) and a TF
# Serving *inference* image (<= 2.20): the Keras 3 ``.keras`` file it writes loads in the
# TF 2.21 used locally, and batch transform can serve the SavedModel with the same version.
TENSORFLOW_VERSION = "2.19"
TENSORFLOW_PY_VERSION = "py312"
# Matches the scikit-learn 1.9 used locally (the PCA model is numpy/scikit-learn only).
SKLEARN_VERSION = "1.9-0"
SKLEARN_PY_VERSION = "py3"

FRAMEWORK_OF_MODEL = {"pca": "sklearn", "siamese": "tensorflow"}


class SageMakerBackendError(RuntimeError):
    """The SageMaker backend cannot be used as configured, or a job did not succeed."""


class _EndpointBotoSession(boto3.Session):
    """A boto3 session whose clients/resources for some services go to given endpoints.

    The SDK builds its clients from the boto session it is handed (``session.client(
    "sagemaker", region)``), so this is the one place to redirect them without globals.
    """

    def __init__(self, endpoints: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoints = {k: v for k, v in endpoints.items() if v}

    def _inject(self, service_name: str, args: tuple, kwargs: dict) -> dict:
        # endpoint_url is the 5th positional parameter after service_name
        if len(args) < 5 and kwargs.get("endpoint_url") is None:
            url = self.endpoints.get(service_name)
            if url:
                kwargs["endpoint_url"] = url
        return kwargs

    def client(self, service_name: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().client(service_name, *args, **self._inject(service_name, args, kwargs))

    def resource(self, service_name: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().resource(service_name, *args, **self._inject(service_name, args, kwargs))


def make_boto_session(
    region: str, endpoints: Mapping[str, str | None] | None = None
) -> boto3.Session:
    """A boto3 session for ``region``; ``endpoints`` maps service names to endpoint URLs."""
    given = {k: v for k, v in (endpoints or {}).items() if v}
    if not given:
        return boto3.Session(region_name=region)
    return _EndpointBotoSession(given, region_name=region)


def make_sagemaker_session(boto_session: boto3.Session, bucket: str, key_prefix: str = "") -> Any:
    """A ``sagemaker.core`` Session whose staging area is ``s3://bucket/key_prefix/``.

    Naming the bucket avoids the SDK's STS lookup and ``sagemaker-<region>-<account>``
    bucket creation; code and driver uploads land under ``key_prefix``.
    """
    os.environ.setdefault("SAGEMAKER_TELEMETRY_OPT_OUT", "true")
    from sagemaker.core.helper.session_helper import Session

    return Session(
        boto_session=boto_session,
        default_bucket=bucket,
        default_bucket_prefix=key_prefix.strip("/") or None,
    )


def image_uri(model: str, region: str, instance_type: str, scope: str = "training") -> str:
    """The AWS Deep Learning Container / framework image for a facereid model kind."""
    os.environ.setdefault("SAGEMAKER_TELEMETRY_OPT_OUT", "true")
    from sagemaker.core import image_uris

    framework = FRAMEWORK_OF_MODEL.get(model)
    if framework == "tensorflow":
        version, py_version = TENSORFLOW_VERSION, TENSORFLOW_PY_VERSION
    elif framework == "sklearn":
        version, py_version = SKLEARN_VERSION, SKLEARN_PY_VERSION
    else:
        raise ValueError(
            f"no SageMaker image for model {model!r}; known: {sorted(FRAMEWORK_OF_MODEL)}"
        )
    return image_uris.retrieve(
        framework=framework,
        region=region,
        version=version,
        py_version=py_version if scope == "training" or framework == "sklearn" else None,
        instance_type=instance_type,
        image_scope=scope,
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``. Split by hand, not by urlparse: a key
    may hold ``#`` or ``?``, which a URL parser would take for a fragment or a query."""
    scheme, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not sep or not bucket:
        raise ValueError(f"not an S3 URI: {uri!r}")
    return bucket, key


def require_s3_storage(storage: Any) -> Any:
    """SageMaker reads and writes S3 only: refuse a local storage with a clear message."""
    if not str(getattr(storage, "uri", "")).startswith("s3://"):
        raise SageMakerBackendError(
            f"the sagemaker backend needs s3:// storage (FACEREID_STORAGE_URI), got "
            f"{getattr(storage, 'uri', storage)!r}"
        )
    return storage


def storage_key_of(storage: Any, uri: str) -> str:
    """The storage key of an ``s3://`` URI inside ``storage`` (bucket + prefix)."""
    bucket, key = split_s3_uri(uri)
    prefix = getattr(storage, "prefix", "")
    if bucket != getattr(storage, "bucket", None) or (prefix and not key.startswith(prefix + "/")):
        raise SageMakerBackendError(f"{uri} is outside the storage {storage.uri}")
    return key[len(prefix) + 1 :] if prefix else key
