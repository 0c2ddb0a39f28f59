"""Durable state and delivery: checkpoints, partition tasks, commits, changelog, transactions."""
