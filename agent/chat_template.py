"""Chat messages to a prompt: the model's own Jinja chat template, rendered in a sandbox.

The template comes from a signed manifest, but a template is code: it runs in Jinja's
immutable sandbox (no attribute access to Python internals, no mutation of the messages),
compiled once per model. The variables are the ones Hugging Face templates expect:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["ChatMessage", "ChatTemplate", "TemplateError", "check_roles"]


class TemplateError(AgentError, ValueError):
    """The chat template does not compile or fails on these messages."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


def check_roles(messages: Sequence[ChatMessage]) -> str | None:
    """Return why the turns are out of order, or None.

    A system turn may come first; then user and assistant alternate, starting with the user,
    and the last turn is the user's (the model answers it).
    """
    turns = list(messages)
    if turns and turns[0].role in ("system", "developer"):
        turns = turns[1:]
    if not any(m.role == "user" for m in turns):
        return "messages have no user turn"
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = i + (len(messages) - len(turns))
            return f"messages[{where}] has role {message.role!r}, expected {expected!r} (roles out of order)"
    if turns[-1].role != "user":
        return "the last message must be the user's"
    return None


class ChatTemplate:
    """A compiled chat template with the model's special tokens."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise
        try:
            self._template: Template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """Return the prompt text; raise TemplateError when the template fails."""
        from jinja2 import TemplateError as JinjaError

        data: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=data,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise TemplateError(f"chat template failed to render: {exc}") from exc


def _raise(message: str) -> None:
    raise TemplateError(message)
