"""Structured outputs: request constraints compiled by xgrammar into the engine's ``Grammar`` protocol.

``spec.py`` says what to compile (parsed from the request by ``server/api``); ``compiler.py``
compiles it once per schema on its own worker thread, never on the engine thread.
"""
