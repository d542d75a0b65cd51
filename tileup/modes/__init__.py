"""The re-diffusion modes, peers over one loaded model: fused, redraw and its seam-fix passes."""
