"""The NATS I/O layer: the only part of ``tunnel`` that imports nats-py."""
