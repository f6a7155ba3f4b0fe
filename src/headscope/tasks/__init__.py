"""Task generators and small data sets for the detectors. Nothing here touches a model's weights."""

from headscope.tasks.repeated_tokens import RepeatedTokens, repeated_random_tokens
from headscope.tasks import conflicts, haystack, multiple_choice, succession  # noqa: F401  (conflicts, needles, questions, successions)

__all__ = ["RepeatedTokens", "repeated_random_tokens"]
