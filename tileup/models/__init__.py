"""Checkpoint loading and family detection (offline), and the one safe weights reader."""
