"""torchrun on CPU (gloo, 2 processes): training matches one process, sampling matches exactly,
and a 2-rank checkpoint resumes on 1 rank; torchrun with 1 process takes the same path."""

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate_flow_matching
import train_flow_matching
from tests.conftest import ROOT
from utils.checkpoint import load_checkpoint
from utils.distributed import cleanup_distributed, setup_distributed


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def logged(ckpt_dir, key):
    return [json.loads(line)[key] for line in open(os.path.join(ckpt_dir, "metrics.jsonl"))]


def max_weight_difference(a, b):
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One torchrun training run shared by the tests below."""
    from tests.conftest import TINY_FLAGS, write_image_folder
    root = tmp_path_factory.mktemp("ddp")
    flags = TINY_FLAGS + ["--data_dir", write_image_folder(root / "images", classes=3, per_class=6),
                          "--batch_size", "8", "--micro_batch_size", "2", "--train_steps", "3", "--log_every", "1",
                          "--save_every", "2",
                          "--lr", "0.003", "--warmup_steps", "0", "--grad_clip", "0"]
    ckpt_dir = str(root / "ckpt2")
    torchrun("train_flow_matching.py", *flags, "--checkpoint_dir", ckpt_dir, "--sample_dir", str(root / "s2"))
    return root, flags, ckpt_dir


def test_two_ranks_match_one_process(two_rank_run):
    """Same global batch, same samples, same per-sample draws, no clipping, two micro-batches a rank
    (DDP all-reduces the accumulated gradient on the last one only): the losses, the
    gradient norms (a loss summed over ranks instead of averaged doubles them, which AdamW's
    weights would not show) and the weights agree up to float summation order (gloo's
    all-reduce vs. one batch), far below the step-to-step changes."""
    root, flags, ckpt_dir = two_rank_run
    one_dir = str(root / "ckpt1")
    assert train_flow_matching.main(flags + ["--checkpoint_dir", one_dir, "--sample_dir", str(root / "s1")]) == 0
    two, one = logged(ckpt_dir, "loss"), logged(one_dir, "loss")
    assert len(two) == len(one) == 3
    np.testing.assert_allclose(two, one, rtol=1e-4)
    np.testing.assert_allclose(logged(ckpt_dir, "grad_norm"), logged(one_dir, "grad_norm"), rtol=1e-4)
    assert abs(one[0] - one[2]) > 1e-3  # the steps changed the loss: the match is not trivial
    final = load_checkpoint(os.path.join(ckpt_dir, "flow_matching_final.pt"))
    assert final["step"] == 3 and not any(k.startswith("module.") for k in final["model"])
    single = load_checkpoint(os.path.join(one_dir, "flow_matching_final.pt"))
    assert max_weight_difference(final, single) < 1e-4
    assert max_weight_difference(final, load_checkpoint(os.path.join(ckpt_dir, "checkpoint_0000002.pt"))) > 1e-3


def test_torchrun_with_one_process_takes_the_multi_gpu_path(two_rank_run):
    """`torchrun --nproc_per_node 1` joins a process group and wraps the model in DDP, as 8 ranks
    do, so that one GPU can check the NCCL path (benchmarks/gpu_check.sh); it saves unwrapped
    weights that match the 2-rank run's."""
    root, flags, ckpt_dir = two_rank_run
    one_dir = str(root / "torchrun1")
    out = torchrun("train_flow_matching.py", *flags, "--checkpoint_dir", one_dir, "--sample_dir",
                   str(root / "st1"), nproc=1).stdout
    assert "1 rank(s) (torchrun, gloo) on cpu" in out
    final = load_checkpoint(os.path.join(one_dir, "flow_matching_final.pt"))
    assert final["step"] == 3 and not any(k.startswith("module.") for k in final["model"])
    assert max_weight_difference(final, load_checkpoint(os.path.join(ckpt_dir, "flow_matching_final.pt"))) < 1e-4


def test_a_process_group_of_one_wraps_the_model_in_ddp(image_folder, monkeypatch):
    """What torchrun --nproc_per_node 1 sets up: a gloo group of one rank, and the model in DDP
    (its weights and losses equal an unwrapped model's, so only the wrapper shows it)."""
    from torch.nn.parallel import DistributedDataParallel

    from configs.cli import make_config
    from configs.flow_matching_config import FlowMatchingConfig
    from data.flow_matching_dataset import get_flow_matching_dataloader
    from models.dit_2d import dit_from_config
    from training.objectives import FlowMatchingObjective
    from training.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    info = setup_distributed("cpu")
    try:
        assert (info.world_size, info.backend, info.distributed) == (1, "gloo", True)
        config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": image_folder, "image_size": 8,
                                                  "hidden_size": 32, "depth": 1, "num_heads": 2, "batch_size": 2,
                                                  "num_workers": 0, "device": "cpu", "num_classes": 3})
        loader, _ = get_flow_matching_dataloader(config, batch_size=2)
        trainer = Trainer(config, dit_from_config(config), FlowMatchingObjective(config, info.device), loader, info)
        assert isinstance(trainer.model, DistributedDataParallel) and trainer.model.module is trainer.raw_model
    finally:
        cleanup_distributed()


def test_two_ranks_match_one_process_with_meanflow(two_rank_run):
    """MeanFlow's JVP runs on the module under DDP; the gradient comes from DDP's own forward, so
    the ranks' gradients are still all-reduced: loss, grad norm and weights match one process."""
    root, flags, _ = two_rank_run
    flags = flags + ["--objective", "meanflow", "--meanflow_ratio", "0.5", "--meanflow_adaptive_p", "0"]
    two_dir, one_dir = str(root / "mf2"), str(root / "mf1")
    torchrun("train_flow_matching.py", *flags, "--checkpoint_dir", two_dir, "--sample_dir", str(root / "smf2"))
    assert train_flow_matching.main(flags + ["--checkpoint_dir", one_dir, "--sample_dir", str(root / "smf1")]) == 0
    np.testing.assert_allclose(logged(two_dir, "loss"), logged(one_dir, "loss"), rtol=1e-4)
    np.testing.assert_allclose(logged(two_dir, "grad_norm"), logged(one_dir, "grad_norm"), rtol=1e-4)
    assert max_weight_difference(load_checkpoint(os.path.join(two_dir, "flow_matching_final.pt")),
                                 load_checkpoint(os.path.join(one_dir, "flow_matching_final.pt"))) < 1e-4


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, tmp_path):
    """The step-2 checkpoint of the 2-rank run, resumed by one process for step 3, reads the
    batch the 2 ranks read at step 3 and ends at their weights and data position."""
    root, flags, ckpt_dir = two_rank_run
    start = tmp_path / "ckpt"
    os.makedirs(start)
    shutil.copy(os.path.join(ckpt_dir, "checkpoint_0000002.pt"), start)
    assert train_flow_matching.main(flags + ["--checkpoint_dir", str(start), "--sample_dir", str(root / "s3"),
                                             "--resume", "latest"]) == 0
    resumed = load_checkpoint(str(start / "flow_matching_final.pt"))
    two = load_checkpoint(os.path.join(ckpt_dir, "flow_matching_final.pt"))
    assert resumed["step"] == two["step"] == 3 and resumed["data"] == two["data"]
    assert max_weight_difference(resumed, two) < 1e-4
    np.testing.assert_allclose(logged(str(start), "loss"), logged(ckpt_dir, "loss")[2:], rtol=1e-4)


def test_two_rank_sampling_writes_the_one_rank_npz(two_rank_run, tmp_path):
    _, _, ckpt_dir = two_rank_run
    checkpoint = os.path.join(ckpt_dir, "flow_matching_final.pt")
    common = ["--checkpoint", checkpoint, "--num_samples", "7", "--batch_size", "2", "--save_npz",
              "--num_steps", "2", "--device", "cpu"]
    torchrun("generate_flow_matching.py", *common, "--output_dir", str(tmp_path / "two"))
    assert generate_flow_matching.main(common + ["--output_dir", str(tmp_path / "one")]) == 0
    two, one = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert np.array_equal(two["images"], one["images"]) and np.array_equal(two["labels"], one["labels"])
    assert len(os.listdir(tmp_path / "two" / "images")) == 7


class NaNOnRankOneAtStep2:
    """The flow objective's interface with a plain loss that is NaN on rank 1 at step 2 only."""
    kind, probe_ema = "flow_matching", False

    def __init__(self, rank):
        self.rank, self.calls = rank, 0

    def loss(self, model, batch, draws):
        self.calls += 1
        loss = model(batch[0], torch.full((len(batch[0]),), 0.5), batch[1]).square().mean()
        return (loss * float("nan") if self.rank == 1 and self.calls == 2 else loss), {}

    def checkpoint_extras(self):
        return {}


@contextlib.contextmanager
def gloo_rank(rank, port):
    """This spawned process as rank `rank` of 2 (gloo, CPU); yields its DistInfo."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    try:
        yield setup_distributed("cpu")
    finally:
        cleanup_distributed()


@contextlib.contextmanager
def gloo_trainer(rank, port, folder, out_dir, objective, **overrides):
    """Rank `rank` of 2 (gloo) of a tiny run on `folder`; `objective(config, device)` builds its objective."""
    from configs.cli import make_config
    from configs.flow_matching_config import FlowMatchingConfig
    from data.flow_matching_dataset import get_flow_matching_dataloader
    from models.dit_2d import dit_from_config
    from training.trainer import Trainer

    with gloo_rank(rank, port) as info:
        config = make_config(FlowMatchingConfig, {
            "dataset": "imagefolder", "data_dir": folder, "image_size": 8, "hidden_size": 32, "depth": 1,
            "num_heads": 2, "batch_size": 4, "num_workers": 0, "mixed_precision": "no", "device": "cpu",
            "sample_every": 0, "checkpoint_dir": os.path.join(out_dir, "ckpt"), **overrides})
        loader, data = get_flow_matching_dataloader(config, batch_size=2, rank=rank, world_size=2)
        config = dataclasses.replace(config, **data.config_fields(config))
        yield Trainer(config, dit_from_config(config), objective(config, info.device), loader, info)


def on_two_ranks(target, folder, out_dir):
    """Runs target(rank, port, folder, out_dir) in 2 spawned processes; returns what each wrote to
    rank<r>.txt, after failing the test if a rank hung."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, port, folder, str(out_dir))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [(out_dir / f"rank{rank}.txt").read_text() for rank in range(2)]


def _train_until_nan(rank, port, folder, out_dir):
    from training.trainer import NonFiniteLoss

    with gloo_trainer(rank, port, folder, out_dir, lambda config, device: NaNOnRankOneAtStep2(rank),
                      train_steps=6, save_every=100, log_every=2, mixed_precision="fp16") as trainer:
        try:
            trainer.fit()
            outcome = "finished"
        except NonFiniteLoss as err:
            outcome = str(err)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(image_folder, tmp_path):
    """Under fp16 only rank 1's loss is NaN; GradScaler skips the step on every rank, so rank 0's
    own loss and weights stay finite (in fp32 or bf16 the all-reduced NaN gradient would show on
    both ranks and hide a per-rank check): both ranks stop at the same check naming the same step, instead of one waiting forever in
    the next collective for the other."""
    outcomes = on_two_ranks(_train_until_nan, image_folder, tmp_path)
    assert all("non-finite at step 2" in o for o in outcomes), outcomes


def _stop_after_a_failed_periodic_write(rank, port, folder, out_dir):
    from training import trainer as trainer_module
    from training.objectives import FlowMatchingObjective

    writes, real_save = [], trainer_module.save_checkpoint

    def full_disk_once(obj, path):
        writes.append(os.path.basename(path))
        if len(writes) == 1:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    trainer_module.save_checkpoint = full_disk_once
    with gloo_trainer(rank, port, folder, out_dir, FlowMatchingObjective,
                      train_steps=100, save_every=1, log_every=100) as trainer:
        if rank == 1:
            trainer.stop_signal = 15   # only rank 1 was signalled; the loop stops after its first step
        try:
            trainer.fit()
            outcome = "finished"
        except SystemExit as exit_:
            outcome = f"exit {exit_.code}: {writes}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)


def test_a_stop_after_rank_zeros_periodic_write_failed_writes_it_on_every_rank_together(image_folder, tmp_path):
    """Rank 0 could not write step 1's periodic checkpoint (a full disk) and rank 1 gets a stop
    signal at that step: the ranks must agree to write it again (a collective), or rank 0 writes
    alone while rank 1 waits elsewhere, and the run hangs instead of saving its stop checkpoint."""
    outcomes = on_two_ranks(_stop_after_a_failed_periodic_write, image_folder, tmp_path)
    assert outcomes == ["exit 143: ['checkpoint_0000001.pt', 'checkpoint_0000001.pt']", "exit 143: []"], outcomes
    assert load_checkpoint(str(tmp_path / "ckpt" / "checkpoint_0000001.pt"))["step"] == 1


def codebook_before_a_step():
    """A 4-code quantizer whose code 1 is dead (counted below the threshold), and a batch of 2 that
    the other three codes share unevenly between its two halves."""
    from models.vqvae import VectorQuantizer
    q = VectorQuantizer(4, 2, decay=0.5, dead_code_threshold=1.0).train()
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-5.0, 5.0], [5.0, -5.0]]))
    q.cluster_size.copy_(torch.tensor([10.0, 0.5, 10.0, 10.0]))
    q.embed_sum.copy_(q.embedding * q.cluster_size.unsqueeze(1))
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 4
    return q, z


def _vq_step_on_half_the_batch(rank, port, folder, out_dir):
    with gloo_rank(rank, port):
        q, z = codebook_before_a_step()
        q(z[rank:rank + 1], torch.Generator().manual_seed(rank))   # each rank's own restart draws
        torch.save(dict(q.state_dict()), os.path.join(out_dir, f"codebook{rank}.pt"))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("done")


def test_two_ranks_update_one_codebook_as_one_process_would(tmp_path):
    """VQ-VAE training under torchrun: each rank quantizes its half of the batch, and the codebook's
    EMA counts and sums are summed over ranks, so both ranks hold the codebook one process makes from
    the whole batch; a dead code restarts on rank 0's draw on every rank (not on each rank's own,
    which would leave the ranks with different codebooks from then on)."""
    assert on_two_ranks(_vq_step_on_half_the_batch, "", tmp_path) == ["done", "done"]
    ranks = [torch.load(tmp_path / f"codebook{rank}.pt") for rank in range(2)]
    one, z = codebook_before_a_step()
    one(z, torch.Generator().manual_seed(0))
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key][[0, 2, 3]], one.state_dict()[key][[0, 2, 3]])
    first_half = z[:1].permute(0, 2, 3, 1).reshape(-1, 2)
    assert (first_half == ranks[0]["embedding"][1]).all(1).any()   # restarted on a vector of rank 0's half


def _pick_a_loader_with_less_memory_on_rank_one(rank, port, folder, out_dir):
    from configs.cli import make_config
    from configs.flow_matching_config import FlowMatchingConfig
    from data import flow_matching_dataset

    if rank == 1:   # this rank's device has almost no free memory: the decoded set does not fit
        flow_matching_dataset.free_memory = lambda device: 1024
    with gloo_rank(rank, port):
        config = make_config(FlowMatchingConfig, {
            "dataset": "imagefolder", "data_dir": folder, "image_size": 8, "batch_size": 4, "num_workers": 0,
            "device": "cpu", "data_loader": "auto", "data_cache_dir": os.path.join(out_dir, "cache")})
        loader, _ = flow_matching_dataset.get_flow_matching_dataloader(config, batch_size=2, rank=rank,
                                                                       world_size=2)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(type(loader).__name__)


def test_every_rank_picks_the_same_data_loader(image_folder, tmp_path):
    """--data_loader auto where one rank's device lacks the memory for the decoded set: every rank
    takes the worker loader, or rank 0 would wait alone in the device loader's cache barrier."""
    outcomes = on_two_ranks(_pick_a_loader_with_less_memory_on_rank_one, image_folder, tmp_path)
    assert outcomes == ["DataLoader", "DataLoader"], outcomes
