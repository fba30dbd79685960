"""What a generation returns (text, tokens, why it stopped, timings) and how it fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

# on_token(text_delta, token_id) after each generated token; return False to stop
StreamCallback = Callable[[str, int], Optional[bool]]


class Interrupted(RuntimeError):
    """Eager work (``VLMEngine.prepare``) gave way to a request before it finished.

    What was done stays usable: a finished image encoding stays cached, a partly
    prefilled prefix stays in the KV cache (the next prompt reuses it).
    """


class ContextOverflowError(ValueError):
    """The prompt does not fit in the context window; the message says by how much."""


@dataclass
class Timings:
    """Where the time of one :meth:`VLMEngine.generate` call went."""

    image_encode_ms: float = 0.0
    image_cached: bool = False
    image_tiles: int = 0
    image_tokens: int = 0
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0
    prefill_ms: float = 0.0
    prefill_tokens_per_second: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_ms: float = 0.0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0

    def as_dict(self) -> dict:
        """Return a plain dict (for JSON and ROS messages)."""
        return asdict(self)


@dataclass
class GenerationResult:
    """Output of :meth:`VLMEngine.generate`.

    ``stop_reason``: ``eos``, ``stop_string``, ``max_new_tokens``, ``cancelled`` or
    ``context_full``. ``tokens`` are the generated ids (a stop token included).
    """

    text: str
    tokens: list
    stop_reason: str
    timings: Timings = field(default_factory=Timings)
