"""The safety filter, for every path a prompt or an answer takes (HTTP API, MQTT device front,
offloaded answers): `PolicySource(config).current()` gives the SafetyFilter in force;
`screen_prompt(filter, prompt)` checks a request; `screen(text, "output")` a whole answer;
`output_guard()` a streamed one."""

from .filter import Hit, OutputGuard, PolicyViolation, SafetyFilter, Screened, screen_prompt
from .policy import Category, SafetyConfig
from .source import PolicySource

__all__ = ["Category", "Hit", "OutputGuard", "PolicySource", "PolicyViolation", "SafetyConfig", "SafetyFilter", "Screened",
           "screen_prompt"]
