"""Spell Platform: a marketplace and execution platform for paid automations."""
