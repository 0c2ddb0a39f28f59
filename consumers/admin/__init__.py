"""The stream admin API: look at one stream, list them, reset or delete one (docs/admin-api.md)."""
