"""Where work runs and where it is recorded: Ray Train, Ray evaluation, MLflow tracking."""
