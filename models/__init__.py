"""Networks: DiT2D (the velocity model), its layers, and the VQ-VAE for latent flow matching."""
