"""Stripe billing: the gateway, webhook verification and handlers, settlement (issue #4)."""
