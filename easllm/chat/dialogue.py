"""One long-lived conversation (a WebSocket connection): its rounds and the system prompt in force."""

from __future__ import annotations

from collections.abc import Iterable

from easllm.chat.template import Conversation

Round = tuple[str, str]


class Dialogue:
    """Each answered round is recorded, so the client never resends the history.

    Only the last `max_rounds` rounds are kept: those are all the prompt can use (the chat
    service applies `max_round` too), and a connection that lives for hours stays small."""

    def __init__(self, max_rounds: int, system_prompt: str = "") -> None:
        self.max_rounds = max(max_rounds, 0)
        self.system_prompt = system_prompt
        self._rounds: list[Round] = []

    @property
    def rounds(self) -> list[Round]:
        return list(self._rounds)

    def conversation(self, prompt: str) -> Conversation:
        return Conversation(prompt, self.system_prompt, tuple(self._rounds))

    def replace_rounds(self, rounds: Iterable[Round]) -> None:
        self._rounds = [(user, assistant) for user, assistant in rounds]
        self._trim()

    def record(self, prompt: str, answer: str) -> None:
        self._rounds.append((prompt, answer))
        self._trim()

    def _trim(self) -> None:
        if len(self._rounds) > self.max_rounds:
            del self._rounds[: len(self._rounds) - self.max_rounds]
