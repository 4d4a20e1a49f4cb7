"""Conversation history: one record per answered round, exported per period as JSON Lines."""
