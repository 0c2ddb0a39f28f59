"""The Kafka boundary: clients, aiokafka's fenced internals, the outbox and its rescue path."""
