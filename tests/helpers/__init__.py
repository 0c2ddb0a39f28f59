"""What several test modules share (test modules import helpers from here, never each other)."""
