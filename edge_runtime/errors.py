"""Errors the engine raises on bad input; each carries a one-line message for the user."""


class EdgeRuntimeError(Exception):
    """Base class for errors meant to be shown to a user as one line."""


class CheckpointError(EdgeRuntimeError):
    """A checkpoint is corrupt, truncated, missing a tensor, or of an unsupported architecture."""


class ContextLengthExceeded(EdgeRuntimeError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens, but the model's context is {max_context} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class InvalidRequest(EdgeRuntimeError):
    """A generation parameter is out of range or of the wrong type."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
