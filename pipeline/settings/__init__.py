"""The pipeline YAML: its schema, validation, reference text and the facts resolved from it."""
