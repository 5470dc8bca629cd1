"""OEL core: settings, message schemas, topic layout, the object store and the pieces every service shares.

The core imports neither Kafka nor Faust clients; ``oel.ops`` (operator tooling) and the service
packages (``producers``, ``processors``, ``learner``) are the adapters that do.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait; on a few shared cores that makes every step 10-30x
# slower. Passive waiting must be chosen before torch is first imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
