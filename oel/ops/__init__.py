"""Operator tooling: creating topics and running the local stack. Adapters over the core, like the services."""
