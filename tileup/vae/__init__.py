"""The exact tiled VAE (whole-image GroupNorm statistics) and the runner that owns its precision."""
