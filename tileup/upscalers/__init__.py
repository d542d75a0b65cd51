"""Upscalers: SR models through spandrel (exact tiled inference), resamplers, latent modes, and
the name registry (:mod:`tileup.upscalers.registry`, light to import)."""
