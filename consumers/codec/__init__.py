"""The wire format and the per-poll codec: records to step requests, results to records."""
