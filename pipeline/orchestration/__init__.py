"""Running a pipeline: the runner, sweeps and their executors, the command line."""
