"""OEL core: settings, message schemas, topic layout, the object store and the pieces every service shares.

The core imports neither Kafka nor Faust clients; ``oel.ops`` (operator tooling) and the service
packages (``producers``, ``processors``, ``learner``) are the adapters that do.
"""

__version__ = "0.1.0"
