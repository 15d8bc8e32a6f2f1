"""hallkiosk: the edge agent for self-service kiosks in government service halls.

The distribution ships several top-level packages, one per concern:
``edge`` (the agent), ``boards`` (board profiles, sensor-node firmware),
``mqtt_topics`` (the MQTT contract), ``provisioning``, ``emulator`` and ``ops``.
This package holds only what they share: the version, the exception root and the CLI.
"""

__version__ = "0.1.0"
