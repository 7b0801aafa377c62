"""train.py --cuda_graph (ddpm/cuda_graph_step.py). On the CPU nothing is captured: the tests there check the step's
arithmetic with what a graph reads as device tensors (learning rate, EMA decay, the loss sum and the non-finite flag)
against the eager loop's, bit for bit. What a graph changes (its capture, replays, the inputs copied before each
replay, torchrun over NCCL) only the tests marked needs_cuda check, on a GPU: train.py with and without the graph,
a graph run stopped and resumed, replays that never wait for the GPU, and a torchrun run."""

import shutil
import subprocess
import sys

import pytest
import torch

import ddpm.cuda_graph_step
from ddpm import DDPMScheduler, UNet2DModel
from ddpm.cuda_graph_step import DDP_WARMUP_STEPS, WARMUP_STEPS, CudaGraphStep
from ddpm.ema import EMA
from ddpm.lr_schedule import learning_rate, set_learning_rate
from ddpm.train_step import EagerStep
from oracle import TINY, perturb_, single_thread  # noqa: F401  (autouse fixture)
from test_distributed import TRAIN_PY, worker_env
from test_train import TINY_UNET, assert_same_tensors, checkpoint_at, image_folder, run, tiny_args

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def training_state(snr_gamma: float | None):
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY)).train()
    # 2^-8 times warmup factors 1/4, 1/2, 3/4, 1: learning rates a float32 tensor holds exactly, as the float does
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2**-8, fused=True, capturable=True)
    return unet, optimizer, EMA(unet, max_decay=0.999)


def take_steps(step, optimizer, batches) -> list[torch.Tensor]:
    """train.py's loop around a step: the LR set before each update, one micro-batch each; the gradient norms."""
    norms = []
    for number, (x0, noise, timesteps) in enumerate(batches):
        set_learning_rate(optimizer, learning_rate("constant_with_warmup", 2**-8, number, 4, 7))
        step.accumulate(x0, noise, timesteps)
        assert step.update(number + 1)
        norms.append(step.grad_norm.clone())
    return norms


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_uncaptured_step_equals_the_eager_step_bit_for_bit(snr_gamma):
    scheduler = DDPMScheduler(prediction_type="sample" if snr_gamma else "epsilon")
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, torch.randn(2, 3, 8, 8, generator=generator),
                torch.randint(0, 1000, (2,), generator=generator)) for _ in range(7)]

    unet, optimizer, ema = training_state(snr_gamma)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    eager = EagerStep(unet, unet, scheduler, optimizer, scaler, ema, None, snr_gamma, 0.5, 1, torch.device("cpu"))
    norms = take_steps(eager, optimizer, batches)

    graphed_unet, optimizer, graphed_ema = training_state(snr_gamma)
    graphed = CudaGraphStep(graphed_unet, graphed_unet, scheduler, optimizer, graphed_ema, None, snr_gamma, 0.5,
                            torch.device("cpu"))
    graphed_norms = take_steps(graphed, optimizer, batches)

    assert optimizer.param_groups[0]["lr"] == 2**-8 and isinstance(optimizer.param_groups[0]["lr"], float)
    assert_same_tensors(unet.state_dict(), graphed_unet.state_dict())
    assert_same_tensors(ema.shadow, graphed_ema.shadow)
    assert (ema.optimization_step, ema.decay) == (graphed_ema.optimization_step, graphed_ema.decay)
    assert torch.equal(torch.stack(norms), torch.stack(graphed_norms))
    assert torch.equal(eager.loss_sum, graphed.loss_sum) and not graphed.nonfinite


def test_a_nonfinite_loss_sets_the_nonfinite_flag_tensor():
    scheduler = DDPMScheduler()
    unet, optimizer, _ = training_state(None)
    step = CudaGraphStep(unet, unet, scheduler, optimizer, None, None, None, 1.0, torch.device("cpu"))
    x0 = torch.zeros(2, 3, 8, 8)
    step.accumulate(x0, torch.randn(2, 3, 8, 8), torch.tensor([0, 999]))
    step.update(1)
    assert not step.nonfinite
    step.accumulate(x0.fill_(float("inf")), torch.randn(2, 3, 8, 8), torch.tensor([0, 999]))
    step.update(2)
    assert step.nonfinite


# -----------------------------------------------------------------------------
# On a GPU: the recorded step inside train.py

# the learning rate rises over the whole run: the replayed steps take the largest steps (which assert_trained_alike
# compares against), each with its own learning rate (which a graph that kept the recording step's would miss)
GPU_RUN = dict(model={**TINY_UNET, "dropout": 0.1}, device="cuda", mixed_precision="bf16", use_ema=True,
               random_flip=True, max_train_steps=8, checkpointing_steps=4, logging_steps=2,
               lr_scheduler="constant_with_warmup", lr_warmup_steps=8)


def assert_trained_alike(a: dict, b: dict, start: dict) -> None:
    """Checkpoint b's weights and EMA equal a's up to float rounding: apart by under 1% of how far a moved since
    `start`. (The learning rate reaches the graph as a float32 tensor, the eager step as a float, so they are not
    bit-identical; and a per-element tolerance would trip where AdamW's early steps turn a rounding-sized gradient
    into a whole learning-rate step. A graph that replayed stale weights, learning rate or EMA decay would be apart
    by about as much as a moved.)"""
    for part in ("model", "ema"):
        flat = lambda state: torch.cat([state[part][name].float().flatten() for name in a[part]])  # noqa: E731
        apart, moved = (flat(b) - flat(a)).norm(), (flat(a) - flat(start)).norm()
        assert moved > 0 and apart <= 1e-2 * moved, f"{part}: apart {apart:.3g}, moved {moved:.3g}"


@needs_cuda
def test_train_py_with_a_cuda_graph_trains_as_without(tmp_path):
    images = image_folder(tmp_path / "images", 40, (8, 8))
    eager = run(tmp_path, output_dir=tmp_path / "eager", train_data_dir=images, **GPU_RUN)
    graphed = run(tmp_path, output_dir=tmp_path / "graphed", train_data_dir=images, cuda_graph=True, **GPU_RUN)
    a, b = checkpoint_at(eager, 8), checkpoint_at(graphed, 8)
    assert_trained_alike(a, b, start=checkpoint_at(eager, 4))  # steps 5-8: replays of the graph recorded at 4
    assert a["state"]["lr_step"] == b["state"]["lr_step"]


@needs_cuda
def test_a_stopped_and_resumed_graph_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    # bit for bit needs cuDNN's deterministic kernels (the default ones may sum in any order with atomics)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    images = image_folder(tmp_path / "images", 40, (8, 8))
    uninterrupted = run(tmp_path, output_dir=tmp_path / "uninterrupted", train_data_dir=images, cuda_graph=True,
                        **GPU_RUN)
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-4", resumed / "checkpoint-4")
    run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", train_data_dir=images, cuda_graph=True,
        **GPU_RUN)
    a, b = checkpoint_at(uninterrupted, 8), checkpoint_at(resumed, 8)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])


@needs_cuda
def test_a_run_without_the_graph_resumes_with_it(tmp_path):
    images = image_folder(tmp_path / "images", 40, (8, 8))
    eager = run(tmp_path, output_dir=tmp_path / "eager", train_data_dir=images, **GPU_RUN)
    resumed = tmp_path / "resumed"
    shutil.copytree(eager / "checkpoint-4", resumed / "checkpoint-4")
    run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", train_data_dir=images, cuda_graph=True,
        **GPU_RUN)
    assert_trained_alike(checkpoint_at(eager, 8), checkpoint_at(resumed, 8), start=checkpoint_at(eager, 4))


@needs_cuda
def test_replayed_steps_never_wait_for_the_gpu(tmp_path, monkeypatch):
    calls = []
    record = CudaGraphStep.__call__

    def call_checking_syncs(self, *args):
        # "error" over the replays of steps 5-7 (the graph is recorded at step WARMUP_STEPS + 1 = 4)
        calls.append(1)
        torch.cuda.set_sync_debug_mode("error" if WARMUP_STEPS + 2 <= len(calls) <= 7 else "default")
        return record(self, *args)

    monkeypatch.setattr(ddpm.cuda_graph_step.CudaGraphStep, "__call__", call_checking_syncs)
    try:
        run(tmp_path, train_data_dir=image_folder(tmp_path / "images", 40, (8, 8)), cuda_graph=True,
            **{**GPU_RUN, "logging_steps": 100, "checkpointing_steps": 100})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 8


@needs_cuda
def test_a_torchrun_graph_run_records_its_step_with_ddp_over_nccl_and_trains_as_one_process(tmp_path):
    """torchrun with one process: DDP built on the recording stream, DDP_WARMUP_STEPS eager steps, then the step
    recorded with DDP's NCCL all-reduce in it; the training equals the plain graph run's up to float rounding. (With
    one rank the all-reduce changes no number: that ranks agree is test_distributed.py's check, uncaptured.)"""
    images = image_folder(tmp_path / "images", 40, (8, 8))
    # checkpoints at the recording step, DDP_WARMUP_STEPS + 1, and at the end, after 4 replays
    options = {**GPU_RUN, "train_data_dir": images, "cuda_graph": True, "max_train_steps": DDP_WARMUP_STEPS + 5,
               "lr_warmup_steps": DDP_WARMUP_STEPS + 5, "checkpointing_steps": DDP_WARMUP_STEPS + 1}
    single = run(tmp_path, output_dir=tmp_path / "single", **options)
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(TRAIN_PY), *tiny_args(tmp_path, output_dir=tmp_path / "ddp", **options)],
                            env=worker_env(), capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    assert "one CUDA graph per step" in launch.stdout + launch.stderr
    a, b = checkpoint_at(single, DDP_WARMUP_STEPS + 5), checkpoint_at(tmp_path / "ddp", DDP_WARMUP_STEPS + 5)
    assert_trained_alike(a, b, start=checkpoint_at(single, DDP_WARMUP_STEPS + 1))
