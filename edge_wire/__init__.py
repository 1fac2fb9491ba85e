"""What both processes share: the config convention, the engine protocol's frames and messages."""
