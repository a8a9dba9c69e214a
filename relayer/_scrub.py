"""
Keeping a target's token and secrets out of texts that relayer keeps or logs.

A text that relayer did not write itself (an exception's message, a response body, a plugin
transport's reason) may hold the target's token or a webhook secret; before it reaches
``last_error``, a dead letter or a log line, they are removed and the text's length is capped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relayer.config import TargetConfig

#: What stands for the token in a scrubbed text.
REDACTED = "[REDACTED]"


def scrub(text: str, token: str, limit: int = 300) -> str:
    """
    Remove the token from a text, and cap its length.

    Args:
        text: The text.
        token: The target's token; every occurrence is replaced by ``[REDACTED]``.
        limit: The most characters the result holds; a longer text is cut, ending in ``...``.
    """
    if token:
        text = text.replace(token, REDACTED)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def without_token_start(text: str, token: str) -> str:
    """Remove the first part of the token from the end of a text, if it ends with one."""
    for n in range(len(token) - 1, 0, -1):
        if text.endswith(token[:n]):
            return text[:-n]
    return text


def hidden_values(target: TargetConfig) -> list[str]:
    """What never appears in a text about the target: its token, its secrets and their keys."""
    hidden = [target.token] if target.token else []
    for secret in target.secrets:
        hidden += [secret, secret.partition("_")[2]]
    return [h for h in hidden if h]


def scrub_target(text: str, target: TargetConfig, limit: int = 300) -> str:
    """Remove the target's token and secrets from a text, and cap its length."""
    for value in hidden_values(target):
        text = text.replace(value, REDACTED)
    return scrub(text, "", limit)
