"""The engine version recorded in every decision (SPEC §4: replayable in five years)."""

ENGINE_VERSION = "1.0.0"
