"""One typed settings object for the whole system (env prefix ``FACEREID_``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class Settings(BaseSettings):
    """Where data lives, how to reach it and where jobs run.

    Every field can be set as ``FACEREID_<FIELD>`` in the environment or a ``.env`` file.
    """

    model_config = SettingsConfigDict(env_prefix="FACEREID_", env_file=".env", extra="ignore")

    storage_uri: str = Field(
        default="file://./var/storage",
        description="Root of all objects: file:///abs/dir, file://./rel/dir or s3://bucket/prefix",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint override (moto, MinIO); None = real AWS"
    )
    aws_region: str = Field(default="us-east-1", description="AWS region for S3 and SageMaker")
    lfw_data_home: str | None = Field(
        default=None,
        description="scikit-learn data_home holding lfw_home/ (None = sklearn's default)",
    )
    lfw_people_url: str | None = Field(
        default=None,
        description="Where a download fetches the LFW people files (None = the LFW site; "
        "scikit-learn fetches the images and pairs files)",
    )
    cache_dir: str = Field(
        default="./var/cache", description="Writable scratch space (sklearn joblib cache, models)"
    )
    backend: Literal["local", "sagemaker"] = Field(
        default="local", description="Where training and batch inference run"
    )
    sagemaker_role_arn: str = Field(
        default="arn:aws:iam::123456789012:role/facereid-sagemaker",
        description="Execution role SageMaker jobs assume",
    )
    sagemaker_instance_type: str = Field(default="ml.m5.xlarge")
    sagemaker_gpu_instance_type: str = Field(default="ml.g5.xlarge")
    sagemaker_job_timeout_s: int = Field(
        default=6 * 3600, ge=60, description="Max runtime of a SageMaker job, in seconds"
    )
    local_training_timeout_s: int = Field(
        default=24 * 3600,
        ge=60,
        description="A local training script still running after this is killed (a hung "
        "script must not hold the weekly retrain, and those queued behind it, forever)",
    )
    inference_precision: Precision = Field(
        default="auto",
        description=(
            "Siamese inference precision for local verify: bfloat16 computes the conv body in "
            "bfloat16 (~1.5x faster on CPUs with AVX512-BF16, slower without); auto = "
            "bfloat16 where it is native, else float32"
        ),
    )
    verify_allowed_prefixes: list[str] = Field(
        default_factory=lambda: ["incoming/", "images/", "uploads/"],
        description="Key prefixes in the storage bucket that pair lists may reference",
    )

    @field_validator("storage_uri")
    @classmethod
    def _check_scheme(cls, value: str) -> str:
        if value.startswith("s3://"):
            if not value[len("s3://") :].split("/", 1)[0]:
                raise ValueError(
                    f"storage_uri {value!r} names no bucket (s3://bucket/prefix); is the "
                    "variable that should hold the bucket name set?"
                )
            return value.rstrip("/")
        if value.startswith("file://"):
            path = value[len("file://") :]
            if not path:
                raise ValueError(f"storage_uri {value!r} names no folder (file:///abs/dir)")
            return "file://" + (path.rstrip("/") or "/")
        raise ValueError(f"storage_uri must start with file:// or s3://, got {value!r}")

    @field_validator("verify_allowed_prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str]) -> list[str]:
        """Each prefix names a folder: ``images`` would also allow ``images_private/``,
        and an empty one the whole bucket (models, ledger), so it is refused."""
        out = []
        for prefix in value:
            clean = prefix.strip().lstrip("/")
            if not clean.strip("/"):
                raise ValueError(
                    f"verify_allowed_prefixes: {prefix!r} would allow the whole bucket; "
                    "name folders such as images/"
                )
            out.append(clean if clean.endswith("/") else clean + "/")
        return out

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve()


# FACEREID_* variables read by the tooling (scripts, tests), not by Settings
TOOLING_VARIABLES = frozenset(
    {
        "FACEREID_PREFECT_PORT",
        "FACEREID_REAL_LFW_DATA_HOME",
        "FACEREID_REQUIRE_SAGEMAKER",
        "FACEREID_UPDATE_SNAPSHOTS",
        "FACEREID_WORK_POOL",
    }
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``FACEREID_*`` names nothing reads: a typo (``FACEREID_STORAGE``) would otherwise
    silently leave the default (``./var/storage``) in force."""
    known = {f"FACEREID_{name.upper()}" for name in Settings.model_fields} | TOOLING_VARIABLES
    return sorted(
        k
        for k in environ
        if k.upper().startswith("FACEREID_")
        and k.upper() not in known
        and not k.upper().startswith("FACEREID_TEST_")
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; tests call ``get_settings.cache_clear()``."""
    unknown = unknown_variables(os.environ)
    if unknown:
        warnings.warn(
            f"ignoring unknown settings {unknown}; known: "
            + ", ".join(f"FACEREID_{n.upper()}" for n in Settings.model_fields),
            stacklevel=2,
        )
    return Settings()
