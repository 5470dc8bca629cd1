"""Model access: the default model, the backend interface and its implementations."""
