"""The config CLI: every field is a flag, presets apply first, bad input exits 2 naming the flag."""

import dataclasses
import re
import typing
import subprocess
import sys

import pytest

import flow_matching
from configs.cli import field_choices, format_config, make_config
from configs.flow_matching_config import PRESETS, FlowMatchingConfig, parse_flow_matching_config
from evaluation import posthoc_ema
from models import dit_2d
from optimizers import muon
from tests.conftest import ROOT
from training import optim, trainer


def test_defaults_are_the_seed_run():
    c = parse_flow_matching_config([])
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size) == (768, 12, 12, 2)
    assert (c.batch_size, c.lr, c.train_steps, c.num_sampling_steps, c.cfg_scale) == (128, 1e-4, 100_000, 50, 3.0)
    assert (c.class_dropout_prob, c.ema_decay, c.mixed_precision) == (0.1, 0.9999, "bf16")
    assert (c.save_every, c.sample_every, c.checkpoint_dir, c.sample_dir) == (5000, 1000, "checkpoints", "samples")


# Fields whose example value needs a specific form, and flags that other values need beside them.
SPECIAL_VALUES = {"num_classes": ("7", 7), "resume": ("latest", "latest"), "hidden_size": ("64", 64),
                  "vqvae_checkpoint": (__file__, __file__), "init_from": (__file__, __file__),
                  "ema_snapshot_sigma_rels": ("0.03,0.2", "0.03,0.2"), "compile": ("true", True),
                  "in_channels": ("1", 1)}
CONTEXT = {"hidden_size": ["--num_heads", "4"], "micro_batch_size": ["--batch_size", "8"],
           "latent_size": ["--vqvae_checkpoint", __file__], "latent_channels": ["--vqvae_checkpoint", __file__]}


def example_value(f, current):
    """A valid value different from the default, as a flag string, for each field type."""
    if f.name in SPECIAL_VALUES:
        return SPECIAL_VALUES[f.name]
    if isinstance(current, bool):
        return str(not current).lower(), not current
    choices = field_choices(FlowMatchingConfig, f.name)
    if choices is not None:
        other = next(c for c in choices if c != current)
        return str(other), other
    kind = typing.get_type_hints(FlowMatchingConfig)[f.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float:
        return ("0.5", 0.5) if current != 0.5 else ("0.25", 0.25)
    if kind is int:
        return ("4", 4) if current != 4 else ("3", 3)
    return "xyz", "xyz"


def test_every_field_can_be_overridden():
    defaults = FlowMatchingConfig()
    for f in dataclasses.fields(FlowMatchingConfig):
        text, value = example_value(f, getattr(defaults, f.name))
        assert value != getattr(defaults, f.name), f.name   # an ignored flag would go unnoticed
        config = parse_flow_matching_config([f"--{f.name}", text, *CONTEXT.get(f.name, [])])
        assert getattr(config, f.name) == value, f.name


@pytest.mark.parametrize("flags,compiled", [
    (["--device", "cpu"], False), (["--device", "cuda"], True), (["--device", "cuda", "--compile", "false"], False),
    (["--device", "cuda", "--objective", "meanflow"], False), (["--device", "cpu", "--compile", "true"], True),
    (["--device", "cuda", "--compile", "none"], True)])
def test_compile_defaults_to_on_for_flow_matching_on_cuda(flags, compiled):
    """The seed run on a GPU compiles (measured 1.33x the eager step on an H200): --compile none (the
    default) resolves to a bool when the flags are parsed, so the config saved with the run says what
    ran; the CPU and MeanFlow (its JVP runs eager) stay eager unless told."""
    config = parse_flow_matching_config(flags)
    assert config.compile is compiled and config.compile_mode == "blocks"


def test_booleans_and_none():
    assert parse_flow_matching_config(["--hflip", "false"]).hflip is False
    assert parse_flow_matching_config(["--compile", "True"]).compile is True
    assert parse_flow_matching_config(["--num_classes", "none"]).num_classes is None


def test_presets_apply_before_flags():
    tiny = parse_flow_matching_config(["--preset", "tiny"])
    assert tiny.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert parse_flow_matching_config(["--preset", "tiny", "--depth", "3"]).depth == 3


@pytest.mark.parametrize("argv,needle", [
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--hidden", "48"], "unrecognized arguments: --hidden 48"),   # no abbreviations (48 would be a valid --hidden_size)
    (["--lr", "fast"], "--lr"),
    (["--mixed_precision", "fp8"], "fp8"),
    (["--hflip", "maybe"], "--hflip"),
    (["--preset", "huge"], "huge"),
    (["--hidden_size", "100"], "--hidden_size 100"),      # validate(): not divisible by heads
    (["--batch_size", "10", "--micro_batch_size", "4"], "--micro_batch_size 4"),
    (["--image_size", "30", "--patch_size", "4"], "--image_size 30"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--grad_clip", "inf"], "--grad_clip must be a finite number"),
    (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
    (["--class_dropout_prob", "0"], "--cfg_scale 3.0 would guide"),
    (["--class_dropout_prob", "1"], "--class_dropout_prob must be in [0, 1), got 1.0"),
    (["--class_dropout_prob", "-0.1"], "--class_dropout_prob must be in [0, 1), got -0.1"),
    (["--in_channels", "4"], "--in_channels must be 3 (RGB) or 1 (grayscale), got 4"),
    (["--compile", "maybe"], "argument --compile: expected true, false or none, got 'maybe'"),
    (["--hidden_size", "66", "--num_heads", "2"], "--hidden_size 66 must be divisible by 4"),
    (["--mlp_ratio", "0.001"], "--mlp_ratio 0.001 leaves the gelu MLP no hidden unit"),
    (["--hidden_size", "32", "--num_heads", "2", "--mlp", "swiglu", "--mlp_ratio", "0.04"],
     "--mlp_ratio 0.04 leaves the swiglu MLP no hidden unit"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["--seed", str(2 ** 45)], "--seed must be in [0, 2^32)"),
    (["--objective", "meanflow", "--class_dropout_prob", "0", "--cfg_scale", "1"], "--meanflow_guidance_mix 0.5) is built"),
    (["--num_classes", "-1"], "--num_classes must be >= 0 (0 = unconditional), got -1"),
    (["--mlp_ratio", "-1"], "--mlp_ratio -1.0 leaves the gelu MLP no hidden unit"),
    (["--time_embed_scale", "0"], "--time_embed_scale must be > 0 (1000 = DiT's, 1 = t as is), got 0.0"),
    (["--meanflow_ratio", "2"], "--meanflow_ratio must be in [0, 1], got 2.0"),
    (["--meanflow_adaptive_p", "-1"], "--meanflow_adaptive_p must be >= 0 and --meanflow_adaptive_c > 0, got -1.0"),
    (["--meanflow_guidance_mix", "1"], "--meanflow_guidance_mix must be < 1"),
    (["--logit_normal_std", "0"], "--logit_normal_std must be > 0, got 0.0"),
    (["--fid_batch_size", "0"], "--fid_batch_size must be >= 1, got 0"),
    (["--fid_ref_num_images", "1"], "--fid_ref_num_images must be 0 (all) or >= 2, got 1"),
    (["--muon_momentum", "1"], "--muon_momentum must be in [0, 1), got 1.0"),
    (["--ema_gamma", "0"], "--ema_gamma must be > 0, got 0.0"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1), got 1.0"),
    (["--ema_snapshot_every", "-1"], "--ema_snapshot_every must be >= 0 (0 = off), got -1"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio must be in [0, 1], got 2.0"),
    (["--latent_size", "4"], "--latent_size / --latent_channels are filled from --vqvae_checkpoint"),
    (["--positions", "sincos_rope", "--hidden_size", "48", "--num_heads", "8"],
     "--positions sincos_rope rotates pairs of each head's channels by rows and by columns: the head dimension "
     "--hidden_size / --num_heads = 6 must be divisible by 4"),
    (["--warmup_steps", "-1"], "--warmup_steps must be >= 0, got -1"),
    (["--ema_snapshot_sigma_rels", "0.05,x"], "--ema_snapshot_sigma_rels must be comma-separated numbers"),
    (["--ema_snapshot_sigma_rels", "0.05,0.05"], "--ema_snapshot_sigma_rels must list distinct values, got '0.05,0.05'"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flow_matching_config(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_an_unguided_meanflow_run_needs_no_null_label():
    """Validation sees the MeanFlow run's own sampling defaults (CFG 1), not the preset's CFG 3 that
    they replace: no --cfg_scale 1 is needed."""
    config = parse_flow_matching_config(["--objective", "meanflow", "--class_dropout_prob", "0",
                                         "--meanflow_guidance_mix", "0"])
    assert (config.class_dropout_prob, config.meanflow_guidance_scale, config.meanflow_guidance_mix) == (0, 1, 0)
    assert config.cfg_scale == 1.0


def test_a_given_none_overrides_the_presets_value():
    assert parse_flow_matching_config(["--preset", "cifar10_speedrun", "--device", "cpu"]).compile is True
    assert parse_flow_matching_config(["--preset", "cifar10_speedrun", "--device", "cpu",
                                       "--compile", "none"]).compile is False   # none = auto: eager on the CPU


def test_a_meanflow_run_samples_with_one_jump_and_no_cfg_and_embeds_t_as_is_unless_told(tmp_path):
    config = parse_flow_matching_config(["--preset", "tiny", "--objective", "meanflow"])
    assert (config.sampler, config.num_sampling_steps, config.cfg_scale, config.time_embed_scale) == ("meanflow", 1, 1.0, 1.0)
    config = parse_flow_matching_config(["--preset", "tiny", "--objective", "meanflow", "--num_sampling_steps", "2",
                                         "--cfg_scale", "1.5", "--sampler", "euler", "--time_embed_scale", "10"])
    assert (config.sampler, config.num_sampling_steps, config.cfg_scale, config.time_embed_scale) == ("euler", 2, 1.5, 10)
    assert parse_flow_matching_config(["--preset", "tiny"]).time_embed_scale == 1000   # flow matching: DiT's
    # --init_from's checkpoint fixes the network: a flow-matching run's default, unless given
    start = tmp_path / "fm.pt"
    start.write_bytes(b"")
    config = parse_flow_matching_config(["--preset", "tiny", "--objective", "meanflow", "--init_from", str(start)])
    assert (config.sampler, config.time_embed_scale) == ("meanflow", 1000)


def test_make_config_rejects_unknown_keys_and_bad_choices():
    with pytest.raises(ValueError, match="bogus"):
        make_config(FlowMatchingConfig, {"bogus": 1})
    with pytest.raises(ValueError, match="--sampler 'no_such_sampler'"):
        make_config(FlowMatchingConfig, {"sampler": "no_such_sampler"})


@pytest.mark.parametrize("name, choices", [
    ("sampler", flow_matching.SAMPLERS), ("time_sampling", flow_matching.TIME_SAMPLINGS),
    ("positions", dit_2d.POSITIONS), ("muon_adjust_lr", muon.ADJUST_LR_FNS),
    ("mixed_precision", tuple(trainer.AUTOCAST_DTYPES)), ("ema_snapshot_dtype", tuple(posthoc_ema.SNAPSHOT_DTYPES)),
    ("lr_schedule", optim.LR_SCHEDULES)])
def test_a_fields_choices_are_the_ones_its_code_implements(name, choices):
    """A choice field's Literal and the tuple of the code that implements it are two lists (configs
    may not import the layer beside it): a new sampler added to one of them alone is a flag that
    parses but fails later, or an option no flag reaches."""
    assert tuple(field_choices(FlowMatchingConfig, name)) == choices


def test_format_config_lists_every_field():
    text = format_config(FlowMatchingConfig())
    assert all(f.name in text for f in dataclasses.fields(FlowMatchingConfig))


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "train_flow_matching.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    missing = [f.name for f in dataclasses.fields(FlowMatchingConfig)
               if not re.search(rf"^\s+--{f.name}\s", out, re.M)]  # a flag's own line: --lr is not --lr_schedule
    assert not missing


def test_the_winning_presets_are_one_recipe_at_two_sizes():
    """cifar10_qk_swiglu keeps the fields the brief fixes; its proxy twin is proxy16 plus the
    same options; both differ from their base only where the recipe (or the NFE budget) says."""
    brief = dict(hidden_size=768, depth=12, num_heads=12, batch_size=128, lr=1e-4, train_steps=100_000)
    options = dict(qk_norm=True, mlp="swiglu", positions="sincos", sampler="midpoint", cfg_scale=1.5)
    pairs = [("cifar10_qk_swiglu", "cifar10", 17), ("proxy16_qk_swiglu", "proxy16", 5)]
    for name, base, steps in pairs:
        winner, plain = (dataclasses.asdict(parse_flow_matching_config(["--preset", p])) for p in (name, base))
        assert {k: v for k, v in winner.items() if plain[k] != v} == \
            {k: v for k, v in dict(options, num_sampling_steps=steps).items() if plain[k] != v}, name
        assert all(winner[k] == v for k, v in options.items()), name
    dit = parse_flow_matching_config(["--preset", "cifar10_qk_swiglu"])
    assert {k: getattr(dit, k) for k in brief} == brief


@pytest.mark.parametrize("values, message", [
    ({"hidden_szie": 64}, "unknown FlowMatchingConfig field(s): hidden_szie"),
    ({"mixed_precision": "fp8"}, "--mixed_precision 'fp8' is not one of bf16, fp16, no"),
])
def test_a_config_built_from_a_mapping_is_checked_like_the_flags(values, message):
    """make_config (configs from code, e.g. the benchmarks' runs and the tests): a misspelt field is
    an error, not a silently ignored key, and a value outside a field's choices is refused, as a
    flag would be."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make_config(FlowMatchingConfig, values)


def test_tensorboard_without_the_package_is_refused_at_parse_time(monkeypatch, capsys):
    """--tensorboard true where the package is missing fails before the run, naming the fix, not at
    the first log line after the data and the model were built."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        parse_flow_matching_config(["--tensorboard", "true"])
    assert exit_info.value.code == 2
    assert "--tensorboard true needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
