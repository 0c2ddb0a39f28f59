"""The Kafka daemon: aiokafka consumer/producer, batching loop, checkpoints, HTTP endpoints."""
