"""Datasets and loaders: CIFAR-10 / ImageFolder, the on-device uint8 loader, cached VQ latents."""
