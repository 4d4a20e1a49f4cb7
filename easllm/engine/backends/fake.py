"""A deterministic engine for tests: characters are tokens, answers are predictable text.

The answer is "You said: <last user message>." followed by a cycle of filler words until
max_new_tokens; a prompt containing "[eos]" ends right after the echo. With temperature > 0
the filler words are shuffled by the request's seed, so seeds are reproducible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Generator

from easllm.engine.sequential import SequentialEngine
from easllm.engine.types import GenerationRequest, ModelInfo

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FILLER = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]
BOS_ID = 1


class FakeEngine(SequentialEngine):
    name = "fake"

    def __init__(
        self,
        context_length: int = 2048,
        token_delay: float = 0.0,
        chat_template: str | None = CHATML,
        max_queue: int = 256,
        keep_requests: int | None = None,
    ) -> None:
        super().__init__("fake-model", max_queue)
        self.context_length = context_length
        self.token_delay = token_delay
        self.chat_template = chat_template
        self.requests: list[GenerationRequest] = []  # what tests inspect
        self.keep_requests = keep_requests  # a served fake keeps only the last ones (no leak)

    def _load(self) -> ModelInfo:
        return ModelInfo(
            name=self.display_name,
            engine=self.name,
            context_length=self.context_length,
            chat_template=self.chat_template,
            eos_token="<|im_end|>",
        )

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return ([BOS_ID] if add_special else []) + [ord(c) for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != BOS_ID)

    def _generate_tokens(self, req: GenerationRequest) -> Generator[tuple[int, str], None, None]:
        self.requests.append(req)
        if self.keep_requests is not None and len(self.requests) > 2 * self.keep_requests:
            del self.requests[: -self.keep_requests]
        prompt = self.detokenize(req.prompt_token_ids)
        user = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        words = [f"You said: {user}."]
        if "[eos]" in prompt:
            yield from self._emit(words)
            return
        filler = list(FILLER)
        if not req.sampling.greedy:
            random.Random(req.sampling.seed).shuffle(filler)
        while True:
            yield from self._emit(words)
            words = [f" {w}" for w in filler]

    def _emit(self, pieces: list[str]) -> Generator[tuple[int, str], None, None]:
        for piece in pieces:
            if self.token_delay:
                time.sleep(self.token_delay)
            yield 1000 + len(piece), piece
