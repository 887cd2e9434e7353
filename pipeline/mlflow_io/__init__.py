"""The one layer that talks to MLflow: runs, artifacts, the store, the Model Registry."""
