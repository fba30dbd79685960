"""Workstation tools (torch): model definitions, training, export, checkpoint conversion.

Imports runtime (the formats it writes for) and data (what it trains on), never ros.
"""
