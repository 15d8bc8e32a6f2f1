"""The city tier: hall brokers bridged to a clustered NATS (JetStream + MQTT gateway).

``pki`` makes the city CA and its certificates, ``bridge`` renders each hall broker's
Mosquitto bridge config, ``cluster`` runs a loopback NATS cluster for tests and the
harness, ``harness`` runs halls of emulated kiosks against it and injects faults.
See docs/city.md.
"""
