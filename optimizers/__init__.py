"""Optimizers beyond torch.optim: Muon with AdamW for the rest, as one optimizer."""
