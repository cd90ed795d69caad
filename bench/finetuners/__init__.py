"""Registered finetuners (SLF, ALF, AFF)."""
