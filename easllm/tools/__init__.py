"""Tool (function) calling: the tools a request offers, the model's call syntax, grammars, checks.

Nothing here knows HTTP or OpenAI field names (protocol/openai_tools.py does); the route gets a
`ToolSession` that prepares the prompt and the grammar and turns generated text into calls.
"""
