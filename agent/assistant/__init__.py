"""The assistant agent (`baaaht-agent assistant`): answers its session's user messages with an LLM
reached through the egress proxy, running the tools the model asks for as scheduler tasks of the
session's worker. See docs/ASSISTANT.md."""
