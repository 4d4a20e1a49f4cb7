"""Prompt construction: system prompt + history + prompt -> token ids, via the model's template."""
