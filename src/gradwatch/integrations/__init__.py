"""Adapters for training frameworks; each needs its framework installed (an optional extra)."""
