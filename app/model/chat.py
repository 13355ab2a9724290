"""Chat templates: how a conversation becomes a prompt for a model trained on plain text.

A template is data, never code: format strings over speaker names, stored in the checkpoint's
tokenizer_config.json under "chat_template" (nothing in a checkpoint is executed, so there
is no Jinja here). A checkpoint without one gets DEFAULT, which writes a conversation the way
the bundled corpus writes a play: each speech is its speaker's name in capitals and a colon,
a newline, the words, and a blank line; the reply is the ASSISTANT's next speech, ended by
the blank line that ends every speech.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A chat template that cannot render a conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    names: dict[str, str] = field(
        default_factory=lambda: {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
    )
    message: str = "{name}:\n{content}\n\n"  # one message, formatted with its speaker's name
    generation_prompt: str = "{name}:\n"  # opens the assistant's reply
    stop: tuple[str, ...] = ("\n\n",)  # ends the assistant's turn (not part of the reply)

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.names]
        if missing:
            raise ChatTemplateError(f"chat template: no name for the roles {missing}")
        try:
            self.message.format(name="x", content="y")
            self.generation_prompt.format(name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ChatTemplateError(f"chat template: a format string names an unknown field ({exc})") from exc

    def render(self, messages: Sequence[tuple[str, str] | tuple[str, str, str | None]]) -> str:
        """The prompt for (role, content) or (role, content, name) messages, ending with the
        assistant's turn opened. A message's name, when given, is its speaker's name in place
        of its role's (two users as ROMEO and JULIET)."""
        text = "".join(
            self.message.format(name=(named[0] if named and named[0] else self.names[role]), content=content)
            for role, content, *named in messages
        )
        return text + self.generation_prompt.format(name=self.names["assistant"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTemplate:
        known = {"names", "message", "generation_prompt", "stop"}
        if not isinstance(data, dict) or set(data) - known:
            raise ChatTemplateError(f"chat template: expected an object with keys among {sorted(known)}")
        if "stop" in data:
            data = {**data, "stop": tuple(data["stop"])}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "message": self.message,
            "generation_prompt": self.generation_prompt,
            "stop": list(self.stop),
        }


DEFAULT = ChatTemplate()


def load_chat_template(ckpt_dir: str | Path) -> ChatTemplate:
    """The checkpoint's template (tokenizer_config.json "chat_template"), else DEFAULT."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return DEFAULT
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "chat_template" not in data:
        return DEFAULT
    try:
        return ChatTemplate.from_dict(data["chat_template"])
    except (ChatTemplateError, TypeError) as exc:
        raise ChatTemplateError(f"{path}: {exc}") from exc
