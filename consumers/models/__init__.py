"""The served model's life: where ``--model`` points, and reloads without a restart."""
