"""The engine process: the parent's client, the child that holds the state, their messages."""
