"""Promotion into the MLflow Model Registry: log the ONNX model, register a version, tag it, alias it."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow import MlflowClient


def promote_model(
    client: MlflowClient,
    run_id: str,
    *,
    model: Any,
    signature: Any,
    registered_model: str,
    alias: str | None,
    tags: dict[str, str],
    description: str,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Log ``model`` under the active run ``run_id`` and register it; returns name, version, alias."""
    info = mlflow.onnx.log_model(
        onnx_model=model,
        name="model",
        signature=signature,
        registered_model_name=registered_model,
        save_as_external_data=False,
    )
    for key, metric in metrics.items():  # linked to the LoggedModel, so the model page shows them
        mlflow.log_metric(key, metric, model_id=info.model_id, run_id=run_id)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    client.update_model_version(registered_model, version, description=description)
    if alias:
        client.set_registered_model_alias(registered_model, alias, version)
    return {"name": registered_model, "version": version, "alias": alias}
