"""Blend windows of fused tiles, the colour fix and seam metrics."""
