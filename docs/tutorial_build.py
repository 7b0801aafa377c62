"""Writes docs/tutorial.ipynb from the cells below, runs it top to bottom and stores it with its outputs.

    OMP_NUM_THREADS=1 .venv/bin/python docs/tutorial_build.py

About 4 minutes on this project's 2-core machine while other jobs ran (OMP_NUM_THREADS=1 there: on two busy cores
two threads ran a training step 14x slower than one). The stored outputs are that run's.

Edit the cells here, not in the notebook: tests/test_tutorial.py checks that the two agree, and runs the notebook.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).with_name("tutorial.ipynb")

INTRO = r"""
# DDPM, step by step, with this project's code

Ho, Jain & Abbeel, *Denoising Diffusion Probabilistic Models* (2020), read through `ddpm`'s own modules, in
pictures. Each section opens with the paper's equation or algorithm it shows and the function that does it:

1. **The data** x_0 ~ q(x_0)
2. **The forward process** q(x_t | x_0) (Eq. 4) and the noise schedule
3. **The network** eps_theta(x_t, t)
4. **Algorithm 1**, training: two minutes on a CPU, and the loss curve
5. **Algorithm 2**, sampling: the reverse trajectory x_T -> x_0; DDPM against DDIM and DPM-Solver++
6. **The bound** (Eq. 5): bits per timestep, and the rate-distortion picture of Sec. 4.3
7. **The folder**: the trained model as a diffusers `DDPMPipeline` folder

It needs no GPU, no download and no diffusers (section 7 uses diffusers if it is installed): from the
repository root, `pip install -e '.[plot]' jupyter`, then `jupyter notebook docs/tutorial.ipynb`. Run top to
bottom it took about 4 minutes on one thread of a 2-core CPU busy with other jobs; the outputs stored here
are that run's.

Indices: the paper counts timesteps t = 1..T, the code 0..T-1, so the code's t is the paper's t - 1:
`t = 999` is x_T, `t = 0` is x_1. Equations are written in plain text: `abar_t` is alpha-bar_t =
prod_{s<=t} (1 - beta_s).
"""

SETUP = r"""
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto's notebook bars: none are shown here
from ddpm import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, generate, load_pipeline,
                  save_pipeline)
from ddpm.data import HELD_OUT_SEED, TrainingImages, load_images, make_builtin_source
from ddpm.likelihood import VariationalBound, images_as_x0
from ddpm.loss import diffusion_loss, draw_noise_and_timesteps
from ddpm.scheduler import predict_x0
from ddpm.unet import timestep_embedding

torch.manual_seed(0)  # the UNet's initial weights
# Section 4's training time in seconds (the test suite runs the notebook with less)
TRAIN_SECONDS = float(os.environ.get("DDPM_TUTORIAL_TRAIN_SECONDS", 120))
notebook_start = time.perf_counter()


def pixels(image: torch.Tensor):
    # (C, H, W) in [-1, 1] -> (H, W, C) in [0, 1] for imshow
    return (image.detach().float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


def show(rows, column_titles=None, row_titles=None, size=1.2):
    # a table of images in [-1, 1]: a list of rows, each a list of (C, H, W) tensors
    figure, axes = plt.subplots(len(rows), len(rows[0]), figsize=(size * len(rows[0]), size * len(rows)),
                                squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axis = axes[r][c]
            axis.imshow(pixels(image), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0 and column_titles:
                axis.set_title(column_titles[c], fontsize=8)
            if c == 0 and row_titles:
                axis.set_ylabel(row_titles[r], fontsize=8)
    plt.show()
"""

DATA_MD = r"""
## 1. The data: x_0 ~ q(x_0)

**Paper:** Sec. 3.3: the data are images whose integers 0..255 are scaled linearly to [-1, 1]; Algorithm 1,
line 2 draws x_0 from them. **Code:** `ddpm.data.load_images` picks the source (a Hub dataset, a folder of
images or of MNIST-format IDX files, or with neither the built-in shapes, `ddpm.data.make_builtin_source`);
`ddpm.data.TrainingImages` turns each image into a (C, H, W) tensor in [-1, 1].

The built-in shapes: a red, green, blue or orange disc, square or triangle on white or black, 16x16 pixels,
drawn by the package itself. Your own images need one change: `train_data_dir="path/to/folder"` below.
"""

DATA = r"""
source = load_images(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None,
                     resolution=16, seed=0, builtin_size=2048)
# channels=1 for grey data (and in_channels=out_channels=1 for the UNet of section 3)
images = TrainingImages(source, resolution=16, channels=3, center_crop=True, random_flip=False)
data = torch.stack([images[(i, 0)] for i in range(len(images))])  # every x_0, in [-1, 1]
print(f"{source.description}: tensor {tuple(data.shape)}, values {data.min():.0f} to {data.max():.0f}")
show([list(data[row * 12:(row + 1) * 12]) for row in range(3)])
"""

FORWARD_MD = r"""
## 2. The forward process: q(x_t | x_0), Eq. 4

**Paper:** the forward process adds Gaussian noise in T = 1000 steps of variance beta_t (Eq. 2), beta linear
from 1e-4 to 0.02 (Sec. 4). Any x_t can be drawn from x_0 in one go (Eq. 4):

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)

**Code:** `ddpm.DDPMScheduler.add_noise(x_0, eps, t)`; the betas and `alphas_cumprod` (abar_t) are built in
`DDPMScheduler.__init__` (`ddpm/scheduler.py`).

One image and one eps, at seven timesteps:
"""

FORWARD = r"""
scheduler = DDPMScheduler()  # the paper's: T = 1000, betas linear from 1e-4 to 0.02, predict eps
x0 = data[:1]
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
shown = [0, 50, 100, 250, 500, 750, 999]
x_t = [scheduler.add_noise(x0, eps, torch.tensor([t]))[0] for t in shown]
show([[x0[0], *x_t]], column_titles=["x_0", *(f"t = {t}" for t in shown)])
"""

SCHEDULE_MD = r"""
How much of x_0 is left at t is abar_t; the signal-to-noise ratio of x_t is SNR(t) = abar_t / (1 - abar_t).
Beside the paper's linear betas, the cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, Eq. 17;
`DDPMScheduler(beta_schedule="squaredcos_cap_v2")`, `ddpm.scheduler.cosine_betas`) destroys the image more
slowly: the linear one has left almost nothing by t = 600, which at 16x16 wastes many of its steps.
"""

SCHEDULE = r"""
cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
for name, schedule in [("linear (DDPM)", scheduler), ("cosine (Improved DDPM)", cosine)]:
    abar = schedule.alphas_cumprod
    left.plot(abar, label=name)
    right.plot(torch.log(abar / (1 - abar)), label=name)
left.set(xlabel="t", ylabel="abar_t", title="signal kept, abar_t")
right.set(xlabel="t", ylabel="log SNR(t)", title="log SNR(t) = log(abar_t / (1 - abar_t))")
left.legend()
plt.show()
print(f"abar_T: linear {scheduler.alphas_cumprod[-1]:.1e}, cosine {cosine.alphas_cumprod[-1]:.1e} "
      "(x_T is all but pure noise, so p(x_T) = N(0, I) fits it)")
"""

NETWORK_MD = r"""
## 3. The network: eps_theta(x_t, t)

**Paper:** Sec. 3.2 and Appendix B: a U-Net (PixelCNN++'s backbone, Wide ResNet blocks, group normalisation,
self-attention) takes x_t and t and predicts the noise eps in it; t enters through the Transformer's
sinusoidal position embedding, added in every ResNet block. **Code:** `ddpm.UNet2DModel`
(`ddpm/unet.py`: `ResnetBlock2D`, `Attention`, `timestep_embedding`), diffusers' `UNet2DModel` module for
module.

A small one: the `quickstart` preset's (`ddpm/presets.py`), three levels of 16, 32 and 32 channels at
16x16, 8x8 and 4x4, one ResNet block a level on the way down (two on the way up, which also take the skips),
self-attention only in the middle block. The paper's CIFAR-10
model is the same design with four levels of 128 to 256 channels (35.7M parameters).
"""

NETWORK = r"""
unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                   block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D",) * 3,
                   up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)

parts = [("conv_in", unet.conv_in), ("time_embedding", unet.time_embedding),
         *((f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)), ("mid_block", unet.mid_block),
         *((f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)), ("conv_out", unet.conv_out)]
table = []


def record(name, module):
    def hook(module, inputs, output):
        output = output[0] if isinstance(output, tuple) else output  # a down block also returns its skips
        table.append((name, tuple(inputs[0].shape), tuple(output.shape), sum(p.numel() for p in module.parameters())))
    return module.register_forward_hook(hook)


hooks = [record(name, module) for name, module in parts]
with torch.no_grad():
    unet(data[:1], torch.tensor([500]))
for hook in hooks:
    hook.remove()
print(f"{'part':16}{'input':>20}{'output':>20}{'parameters':>12}")
for name, shape_in, shape_out, count in table:
    print(f"{name:16}{str(shape_in):>20}{str(shape_out):>20}{count:>12,}")
print(f"{'all':16}{'':>40}{sum(p.numel() for p in unet.parameters()):>12,}")
"""

EMBEDDING_MD = r"""
The network is told t by `timestep_embedding`: sines and cosines of t at geometrically spaced frequencies
(Appendix B), here 16 numbers per t; an MLP widens them to 64, which each ResNet block projects onto its own
channels and adds.
"""

EMBEDDING = r"""
config = unet.config
embedding = timestep_embedding(torch.arange(1000), config["block_out_channels"][0], config["flip_sin_to_cos"],
                               config["freq_shift"])
plt.figure(figsize=(10, 2))
plt.imshow(embedding.T, aspect="auto", cmap="RdBu", interpolation="nearest")
plt.xlabel("t")
plt.ylabel("component")
plt.title("timestep_embedding(t)")
plt.colorbar()
plt.show()
"""

PREDICTION_MD = r"""
What eps_theta predicts for x_t, beside the true eps, at three timesteps (the noise drawn at half scale, so
that most of it fits the images' [-1, 1] window). Untrained, it predicts nothing like it; section 4 trains it
and looks again.
"""

PREDICTION = r"""
def predictions(unet):
    eps = torch.randn(3, *x0.shape[1:], generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([50, 250, 750])
    x_t = scheduler.add_noise(x0.expand(3, -1, -1, -1), eps, timesteps)  # Eq. 4
    with torch.no_grad():
        eps_theta = unet(x_t, timesteps)
    errors = ((eps_theta - eps) ** 2).mean(dim=(1, 2, 3))
    show([[x0[0], x_t[i], eps[i] / 2, eps_theta[i] / 2] for i in range(3)],
         column_titles=["x_0", "x_t", "eps / 2", "eps_theta(x_t, t) / 2"],
         row_titles=[f"t = {t}\nL_simple = {e:.3f}" for t, e in zip(timesteps.tolist(), errors)],
         size=1.5)


predictions(unet)
"""

TRAIN_MD = r"""
## 4. Algorithm 1: training

**Paper**, Algorithm 1:

    1: repeat
    2:   x_0 ~ q(x_0)
    3:   t ~ Uniform({1, ..., T})
    4:   eps ~ N(0, I)
    5:   take a gradient descent step on  grad_theta || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
    6: until converged

The loss of line 5 is L_simple (Eq. 14): the terms of the variational bound (Eq. 12) without their weights.
**Code:** `ddpm.loss.draw_noise_and_timesteps` (lines 3-4) and `ddpm.loss.diffusion_loss` (line 5: Eq. 4, then
Eq. 14, averaged over pixels and batch); `train.py` runs the same loop with the machinery of long runs
(checkpoints, EMA, DDP, mixed precision).

Here: batches of 16 (in two minutes, more steps on fewer images train further than the `quickstart` preset's
64), AdamW, the learning rate warmed up over the first 100 steps and brought down to 0 by half a cosine as
the time runs out, gradients clipped to norm 1 (as `train.py` does). The paper trains 800k steps; two minutes
on a CPU give a rough model, which is enough to see every picture below. (The `quickstart` preset draws crisp
shapes in ten minutes by departing from the paper: `docs/quickstart.md`.)
"""

TRAIN = r"""
optimizer = torch.optim.AdamW(unet.parameters(), lr=4e-3, betas=(0.8, 0.99), weight_decay=1e-6)


def learning_rate(step: int, progress: float) -> float:
    # linear warmup over the first 100 steps; half a cosine from 4e-3 to 0 over the time budget (progress 0..1)
    return 4e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))


generator = torch.Generator().manual_seed(0)  # x_0, t and eps of every step
losses = []
unet.train()
start = time.perf_counter()
while (elapsed := time.perf_counter() - start) < TRAIN_SECONDS:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(len(losses), elapsed / TRAIN_SECONDS)
    x0_batch = data[torch.randint(len(data), (16,), generator=generator)]  # line 2
    eps_batch, t_batch = draw_noise_and_timesteps(x0_batch, scheduler.config["num_train_timesteps"], generator)
    loss = diffusion_loss(unet, scheduler, x0_batch, eps_batch, t_batch)  # line 5, L_simple (Eq. 14)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
unet.eval()
print(f"{len(losses)} steps ({len(losses) * 16:,} images) in {elapsed:.0f} s; "
      f"mean loss of the last 100 steps {sum(losses[-100:]) / len(losses[-100:]):.4f}")

losses_tensor = torch.tensor(losses)
window = min(50, len(losses))
running = losses_tensor.unfold(0, window, 1).mean(dim=1)
plt.figure(figsize=(10, 3))
plt.plot(losses_tensor, alpha=0.3, label="each step")
plt.plot(range(window - 1, len(losses)), running, label=f"mean of {window} steps")
plt.yscale("log")
plt.xlabel("step")
plt.ylabel("L_simple")
plt.title("Algorithm 1: the loss")
plt.legend()
plt.show()
"""

TRAINED_MD = r"""
The same three noised images, trained: eps_theta now finds the noise. Where x_t is mostly noise (t = 750) that
is easy; where the noise is faint (t = 50) the network must tell it from the image's own detail, and the
error of L_simple is largest.
"""

TRAINED = r"""
predictions(unet)
"""

SAMPLE_MD = r"""
## 5. Algorithm 2: sampling

**Paper**, Algorithm 2:

    1: x_T ~ N(0, I)
    2: for t = T, ..., 1 do
    3:   z ~ N(0, I) if t > 1, else z = 0
    4:   x_{t-1} = 1 / sqrt(alpha_t) (x_t - (1 - alpha_t) / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z
    5: end for
    6: return x_0

Line 4 is the mean of Eq. 11 plus noise of sigma_t^2 = betatilde_t (Sec. 3.2). **Code:** `ddpm.generate` is the
whole algorithm; `DDPMScheduler.step` is lines 3-4. It forms the mean from the x_0 of Eq. 15 put into Eq. 7,
which is Eq. 11 as long as x_0 is not clipped; it clips x_0 to [-1, 1], as the paper's code does.

`generate` has no hook into its loop, so the loop is written out here to keep the x_t it passes through, and
the x_0 that eps_theta predicts from each (Eq. 15: x_0 = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)), as the
paper's Fig. 6 shows them. It is `generate`'s loop: the cell checks that both draw the same pixels (over 20
steps, which is quicker).
"""

SAMPLE = r"""
@torch.inference_mode()
def sample_keeping(unet, scheduler, count, generator, kept, steps=1000):
    # Algorithm 2, keeping x_t and the predicted x_0 at the timesteps in `kept`
    x = torch.randn((count, 3, 16, 16), generator=generator)  # line 1: x_T ~ N(0, I)
    scheduler.set_timesteps(steps)
    trajectory, predicted_x0 = {}, {}
    for t in scheduler.timesteps:  # line 2: t = T, ..., 1
        eps_theta = unet(x, t)
        if int(t) in kept:
            trajectory[int(t)] = x
            predicted_x0[int(t)] = predict_x0(eps_theta, x, scheduler.alphas_cumprod[t], "epsilon").clamp(-1, 1)
        x = scheduler.step(eps_theta, t, x, generator=generator)  # lines 3-4
    return x, trajectory, predicted_x0  # line 6: x_0


kept = [999, 900, 750, 600, 500, 400, 250, 100, 0]
start = time.perf_counter()
x0_sampled, trajectory, predicted_x0 = sample_keeping(unet, scheduler, 8, torch.Generator().manual_seed(0), kept)
ddpm_seconds = time.perf_counter() - start
ddpm_images = (x0_sampled / 2 + 0.5).clamp(0, 1)  # [-1, 1] to [0, 1], as generate returns them
print(f"8 images, 1000 steps: {ddpm_seconds:.1f} s")

x0_check = sample_keeping(unet, scheduler, 8, torch.Generator().manual_seed(0), kept=[], steps=20)[0]
assert torch.equal((x0_check / 2 + 0.5).clamp(0, 1),
                   generate(unet, scheduler, 8, torch.Generator().manual_seed(0), num_inference_steps=20))
print("the loop above and ddpm.generate: the same pixels")

for i in range(3):
    show([[trajectory[t][i] for t in kept] + [x0_sampled[i]], [predicted_x0[t][i] for t in kept] + [x0_sampled[i]]],
         column_titles=[f"t = {t}" for t in kept] + ["x_0"], row_titles=["x_t", "predicted x_0"])
"""

DDIM_MD = r"""
### DDPM 1000 steps against DDIM 50 and DPM-Solver++ 20, from the same noise

**Paper:** DDIM (Song, Meng & Ermon 2021, Eq. 12) samples the same trained eps_theta over a subsequence of
the timesteps; with eta = 0 it adds no noise after x_T, so x_T alone decides the image:

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_theta(x_t, t)
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)      (Eq. 9; DDPM's Eq. 15)

**Code:** `ddpm.DDIMScheduler.step`, run by the same `ddpm.generate`.

DPM-Solver++ (Lu et al. 2022) solves the same diffusion ODE as DDIM with eta = 0, but to second order: each
step reuses the previous step's x_0 prediction (multistep), at one network call a step. **Code:**
`ddpm.DPMSolverMultistepScheduler` (`ddpm/dpm_solver.py`), run by `ddpm.generate` too.

The samplers all draw x_T first from the generator, so one seed gives them the same x_T; DDPM then draws fresh
noise at every step, DDIM and DPM-Solver++ none.
"""

DDIM = r"""
ddim = DDIMScheduler.from_config(scheduler.config)
start = time.perf_counter()
ddim_images = generate(unet, ddim, 8, torch.Generator().manual_seed(0), num_inference_steps=50)
ddim_seconds = time.perf_counter() - start
# algorithm_type "dpmsolver++", order 2. DDPM and DDIM clip their x_0 prediction to [-1, 1] (clip_sample); this
# scheduler clips it through thresholding, which with sample_max_value 1 is that same clip
solver = DPMSolverMultistepScheduler.from_config(scheduler.config, thresholding=True, sample_max_value=1.0)
start = time.perf_counter()
solver_images = generate(unet, solver, 8, torch.Generator().manual_seed(0), num_inference_steps=20)
solver_seconds = time.perf_counter() - start
show([list(trajectory[999]), *(list(images * 2 - 1) for images in (ddpm_images, ddim_images, solver_images))],
     row_titles=["x_T", f"DDPM 1000\n{ddpm_seconds:.1f} s", f"DDIM 50\n{ddim_seconds:.1f} s",
                 f"DPM-Solver++ 20\n{solver_seconds:.1f} s"], size=1.1)
"""

BOUND_MD = r"""
## 6. The bound, Eq. 5: bits per timestep

**Paper:** the negative log-likelihood is bounded by a sum of one term per timestep (Eq. 5):

    L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || p(x_T))                      the prior: nearly 0, x_T is noise
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))   two Gaussians: Eq. 6-7 against the model
    L_0     = -log p_theta(x_0 | x_1)                           the discretised decoder, Eq. 13

Each is counted in bits per dimension (divided by C*H*W and by ln 2), as the paper's Table 1 reports
the total. **Code:** `ddpm.likelihood.VariationalBound.evaluate` (all T + 1 terms for a batch);
`python evaluate.py FOLDER` computes the total over a test set. Four held-out images (drawn with another seed than
the training set):
"""

BOUND = r"""
test_x0 = images_as_x0(make_builtin_source(16, HELD_OUT_SEED, 4), resolution=16, channels=3, count=4)  # float64
bound = VariationalBound(scheduler, "fixed_small")  # sigma_t^2 = betatilde_t, as the scheduler samples
start = time.perf_counter()
terms = bound.evaluate(unet, test_x0, torch.Generator().manual_seed(0))
print(f"1000 terms of 4 images: {time.perf_counter() - start:.1f} s")
for i in range(len(test_x0)):
    print(f"image {i}: L = {terms.total[i]:.3f} bits/dim = L_T {terms.prior[i]:.5f} + KL terms {terms.kl[i]:.3f} "
          f"+ L_0 {terms.decoder[i]:.3f}")
print(f"L_0 to L_9, the first 10 of 1000 terms: {100 * terms.terms[:, :10].sum() / terms.total.sum():.0f}% of the bits")

figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1, 3]})
left.imshow(pixels(make_grid(test_x0.float(), nrow=2, padding=1, pad_value=1)), interpolation="nearest")
left.set_axis_off()
left.set_title("test images 0, 1 / 2, 3")
for i in range(len(test_x0)):
    right.plot(terms.terms[i], label=f"image {i}", alpha=0.8)
right.set(yscale="log", xlabel="t (0: the decoder L_0; t > 0: the KL term L_t)", ylabel="bits/dim",
          title="the bound's terms, one per timestep")
right.legend()
plt.show()
"""

RATE_MD = r"""
Nearly all the bits are spent at the first few timesteps, where x_t differs from x_0 by noise too faint to see.

**Paper:** Sec. 4.3 and Fig. 5, progressive coding: a receiver that has been sent x_T, x_{T-1}, ..., x_t has
received L_T + sum_{s>=t} L_s bits (the *rate*), and can already guess x_0 from x_t by Eq. 15; the *distortion* is
the RMSE of that guess on the 0..255 scale. **Code:** the rate from the terms above; the guess is
`ddpm.scheduler.predict_x0` on `eps_theta(x_t, t)` with x_t from `add_noise` (Eq. 4).
"""

RATE = r"""
T = scheduler.config["num_train_timesteps"]
# rate after x_t is received: L_T + the terms L_{T-1} .. L_{t+1} of the steps down to x_t (code indices t+1 .. T-1)
later_terms = terms.terms.flip(1).cumsum(dim=1).flip(1) - terms.terms
rate = (terms.prior[:, None] + later_terms).mean(dim=0)

x0_test = test_x0.float()
distortion = torch.empty(T)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for first in range(0, T, 100):  # 100 timesteps x 4 images per batch
        t = torch.arange(first, first + 100).repeat_interleave(len(x0_test))
        x0_repeated = x0_test.repeat(100, 1, 1, 1)
        x_t = scheduler.add_noise(x0_repeated, torch.randn(x0_repeated.shape, generator=generator), t)
        guess = predict_x0(unet(x_t, t), x_t, scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1), "epsilon").clamp(-1, 1)
        squared = ((guess - x0_repeated) * 127.5).pow(2).mean(dim=(1, 2, 3)).reshape(100, len(x0_test))
        distortion[first:first + 100] = squared.mean(dim=1).sqrt()

figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].plot(distortion)
axes[0].set(xlabel="t", ylabel="distortion (RMSE, 0..255)", title="distortion against t")
axes[1].plot(rate)
axes[1].set(xlabel="t", ylabel="rate (bits/dim)", title="rate against t")
axes[2].plot(rate, distortion)
axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0..255)", title="distortion against rate")
plt.tight_layout()
plt.show()
half = int((distortion < distortion[-1] / 2).nonzero().max())  # the last t whose guess halves the distortion
print(f"at t = {half} the distortion is half that of x_T ({distortion[half]:.1f} of {distortion[-1]:.1f}) for "
      f"{rate[half]:.3f} bits/dim, {100 * rate[half] / terms.total.mean():.1f}% of the {terms.total.mean():.3f} "
      "the whole image costs")
"""

FOLDER_MD = r"""
## 7. The folder: a diffusers DDPMPipeline

**Code:** `ddpm.save_pipeline` writes the trained `unet` and the `scheduler` as the folder diffusers'
`DDPMPipeline.from_pretrained` reads (safetensors weights and diffusers' JSON configs); `ddpm.load_pipeline`
reads it back, and `sample.py FOLDER` draws from it on the command line. `train.py` writes the same folder.
"""

FOLDER = r"""
folder = Path(tempfile.mkdtemp()) / "ddpm-tutorial"
save_pipeline(folder, unet, scheduler)
for path in sorted(folder.rglob("*")):
    if path.is_file():
        print(f"{str(path.relative_to(folder)):45} {path.stat().st_size:>9,} bytes")

loaded_unet, loaded_scheduler = load_pipeline(folder)
ours = generate(loaded_unet, loaded_scheduler, 4, torch.Generator().manual_seed(0), num_inference_steps=100)
assert torch.equal(ours, generate(unet, scheduler, 4, torch.Generator().manual_seed(0), num_inference_steps=100))
print("load_pipeline: the same model, the same pixels")
"""

DIFFUSERS_MD = r"""
If diffusers is installed, the next cell loads the folder with `DDPMPipeline.from_pretrained` and draws from
the same seed: the same pixels, to float rounding. Without diffusers it says so and does nothing.
"""

DIFFUSERS = r"""
try:
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging
except ImportError:
    print("diffusers is not installed: this check is skipped (pip install diffusers to run it)")
else:
    diffusers_logging.set_verbosity_error()  # no advice to install accelerate
    diffusers_logging.disable_progress_bar()
    pipeline = DDPMPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=100,
                      output_type="np").images
    difference = abs(theirs - ours.permute(0, 2, 3, 1).numpy()).max()
    print(f"DDPMPipeline.from_pretrained: largest difference from ddpm.generate {difference:.1e} (pixels in [0, 1])")
    assert difference < 1e-5
    show([list(ours * 2 - 1), [torch.from_numpy(image).permute(2, 0, 1) * 2 - 1 for image in theirs]],
         row_titles=["ddpm", "diffusers"])
"""

NEXT_MD = r"""
## Next

`python train.py` trains the `quickstart` preset: crisp shapes in ten minutes on a CPU. `docs/paper-to-code.md`
follows each equation into the code. `python sample.py FOLDER` and `python evaluate.py FOLDER` sample and score
any pipeline folder, ours or diffusers'.
"""

END = r"""
print(f"the notebook ran in {time.perf_counter() - notebook_start:.0f} s")
"""

CELLS = [
    ("markdown", INTRO), ("code", SETUP),
    ("markdown", DATA_MD), ("code", DATA),
    ("markdown", FORWARD_MD), ("code", FORWARD), ("markdown", SCHEDULE_MD), ("code", SCHEDULE),
    ("markdown", NETWORK_MD), ("code", NETWORK), ("markdown", EMBEDDING_MD), ("code", EMBEDDING),
    ("markdown", PREDICTION_MD), ("code", PREDICTION),
    ("markdown", TRAIN_MD), ("code", TRAIN), ("markdown", TRAINED_MD), ("code", TRAINED),
    ("markdown", SAMPLE_MD), ("code", SAMPLE), ("markdown", DDIM_MD), ("code", DDIM),
    ("markdown", BOUND_MD), ("code", BOUND), ("markdown", RATE_MD), ("code", RATE),
    ("markdown", FOLDER_MD), ("code", FOLDER), ("markdown", DIFFUSERS_MD), ("code", DIFFUSERS),
    ("code", END), ("markdown", NEXT_MD),
]


def build() -> nbformat.NotebookNode:
    """The notebook of CELLS, unexecuted."""
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook = nbformat.v4.new_notebook(cells=[make[kind](source.strip("\n")) for kind, source in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def main() -> None:
    notebook = build()
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3", record_timing=False,  # no timestamps in the file
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}, executed in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
