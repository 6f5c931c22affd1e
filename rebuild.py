"""Every "checkpoint -> model" path of the repo: the one place that reads weights from a file into
a network.

    model, ckpt = load_flow_model("checkpoints/flow_matching_final.pt")   # DiT2D, EMA weights, eval mode
    latent_space = load_latent_space(ckpt)             # its VQ-VAE latent space, or None (pixel space)
    vqvae = load_vqvae("checkpoints/vqvae.pt")         # VQ-VAE, trained weights, eval mode
    model.load_state_dict(initial_weights(path, model, config, fields))   # --init_from

The architecture always comes from the checkpoint's own config (`dit_from_config`,
`vqvae_from_config` beside their networks in models/), never from flags.

Where it sits: above models/ (it builds their networks) and utils/ (the checkpoint format), below
data/ (the latent cache loads the VQ-VAE a config names) and everything above that. It cannot live
in utils/, the bottom layer, because it imports models/; nor in models/, which holds networks only.
So it is a layer of its own between them (tests/test_layers.py).
"""

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from models.dit_2d import DiT2D, dit_from_config
from models.vqvae import VQVAE, LatentSpace, vqvae_from_config
from utils.checkpoint import check_config_fits, load_checkpoint, with_defaults


def load_model(path: str, kind: str, build: Callable[[Dict[str, Any]], torch.nn.Module],
               weights: str, device="cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint of this kind describes and load its weights.

    `build(config dict)` makes the network (dit_from_config, vqvae_from_config). `weights` is
    'model' (the trained weights) or 'ema'. Returns (model in eval mode on `device`, checkpoint dict).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_checkpoint(path, kind=kind)
    model = build(ckpt["config"])
    load_weights(model, ckpt[weights], path, weights)
    return model.to(device).eval().requires_grad_(False), ckpt


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, weights: str,
                 config: str = "its own config") -> None:
    """model.load_state_dict(state, strict=True), where a state of other names or shapes than the
    model built from `config` (a checkpoint of other code, or edited) is a ValueError naming it."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"checkpoint {path}: its {weights!r} weights do not fit the model {config} "
                         f"describes ({detail}); it was written by other code or edited: retrain it, or use "
                         f"the code that wrote it") from None


def load_flow_model(path: str, weights: str = "ema", device="cpu") -> Tuple[DiT2D, Dict[str, Any]]:
    """The DiT2D of a flow-matching checkpoint, rebuilt from its config, with its EMA (default) or
    raw ('model') weights: (model in eval mode on `device`, checkpoint dict)."""
    return load_model(path, "flow_matching", dit_from_config, weights, device)


def load_vqvae(path: str, weights: str = "model", device="cpu") -> VQVAE:
    """The VQ-VAE a train_vqvae.py checkpoint describes, in eval mode on `device`.

    `weights` is 'model' (the trained weights, the default) or 'ema'. The trained weights encode
    and decode, not the trainer's weight EMA: the codebook is a buffer that follows the live
    encoder, and an averaged encoder paired with that codebook would assign codes the decoder was
    not trained with. The result and its `encoder` remember `checkpoint_path`, so either one can
    be handed to the latent data loader.
    """
    model, _ = load_model(path, "vqvae", vqvae_from_config, weights, device)
    model.checkpoint_path = model.encoder.checkpoint_path = path
    return model


def load_latent_space(ckpt: Dict, vqvae_checkpoint: Optional[str] = None,
                      device="cpu") -> Optional[LatentSpace]:
    """The latent space of a latent flow checkpoint (its dict), or None for a pixel-space one.

    The VQ-VAE comes from `vqvae_checkpoint` when given, else from the path the flow config
    recorded. ValueError when no path is known or the file is not the VQ-VAE the model was trained
    with; FileNotFoundError when the file is missing.
    """
    if "latent" not in ckpt:
        if vqvae_checkpoint is not None:
            raise ValueError("--vqvae_checkpoint was given, but this flow checkpoint works in pixel "
                             "space; drop the flag")
        return None
    latent = ckpt["latent"]
    recorded = ckpt["config"].get("vqvae_checkpoint")
    path = vqvae_checkpoint or recorded
    if path is None:
        raise ValueError("this latent flow checkpoint does not record its VQ-VAE; pass "
                         "--vqvae_checkpoint PATH (the VQ-VAE it was trained with)")
    if not os.path.isfile(path):
        if vqvae_checkpoint:   # the user's path, mistyped: not the record's having moved
            raise FileNotFoundError(f"--vqvae_checkpoint {path} does not exist; pass the path of the VQ-VAE this "
                                    f"latent flow model was trained with"
                                    + (f" (it recorded {recorded})" if recorded else ""))
        raise FileNotFoundError(f"the VQ-VAE this latent flow model was trained with, {path}, does not exist "
                                f"(moved?); pass its current path with --vqvae_checkpoint PATH")
    vqvae = load_vqvae(path, device=device)
    if vqvae.fingerprint() != latent["vqvae_fingerprint"]:
        raise ValueError(f"VQ-VAE {path} is not the one this flow model was trained with (its "
                         f"weights differ); pass the original with --vqvae_checkpoint PATH")
    return LatentSpace(vqvae, latent["mean"], latent["std"], latent["vqvae_fingerprint"])


def initial_weights(path: str, model: DiT2D, config, fields, latent_space: Optional[LatentSpace] = None) -> dict:
    """The trained (raw) weights of the flow-matching or MeanFlow checkpoint `path`, ready to load
    strictly into `model` (a run started with --init_from, whose EMA starts from them as in a fresh run).

    The checkpoint must agree with `config` on `fields` (the architecture) and, in a latent run,
    have been trained on `latent_space`. A flow-matching checkpoint lacks the interval embedder of
    a MeanFlow model: those entries come from `model`'s own initialization, whose zero output layer
    leaves the loaded velocity unchanged.
    """
    ckpt = load_checkpoint(path, kind="flow_matching")
    check_config_fits(with_defaults(ckpt["config"], config), dataclasses.asdict(config), fields, path,
                      fix="--init_from builds the model from this run's flags: pass the checkpoint's values "
                          "(or the --preset it was trained with)", use="start from it")
    if latent_space is not None:
        latent_space.check_trained_on(ckpt, f"--init_from {path}")
    own = model.state_dict()
    state = dict(ckpt["model"])
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if unexpected or any(not k.startswith("r_embedder.") for k in missing):
        meanflow = unexpected and all(k.startswith("r_embedder.") for k in unexpected)
        raise ValueError(f"--init_from {path}: its weights do not fit this model (missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); "
                         + ("a MeanFlow checkpoint only initializes a MeanFlow run" if meanflow else
                            "it was written by other code or edited: use the code that wrote it"))
    state.update({k: own[k] for k in missing})
    return state
