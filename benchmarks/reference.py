"""This project's DenseNet-121 3D train step against the authors' PyTorch + MONAI step, same CPU.

make benchmark-reference            # builds .venv-reference (setup.cfg's [reference]), runs this
python -m benchmarks.reference [--crops=128] [--rounds=3] [--steps=2] [--dtypes=float32,bfloat16]
                                [--stages]

The reference is the authors' step: MONAI `DenseNet121(spatial_dims=3, in_channels=1,
out_channels=1024)` on NCDHW float32 crops, AdamW (lr 1e-3, weight decay 1e-2), gradient clipping
at global norm 2.0, loss = MSE between `torch.cdist` of the embeddings and the crop-centre distance
matrix / 100 over all pairs. The project's step is `isimed.train_state.create_train_step` with the
paper preset of configs/isimed_chest.py (DenseNet-121, ISImed loss, AdamW, clipping 2.0)
overridden to the same crops (8 images x crops/8, 32^3), in float32 and bfloat16.

Each variant runs in a worker process of its own, as a user runs one framework, all started
first; the parent then has them step in turn, variant by variant, for --rounds rounds after a
warm-up (compile) step each, with torch.set_num_threads(--threads) (default: all cores). Each round
times --steps steps per variant, while the other workers wait idle. The table gives the best and
the median round (crops/s); the last line compares the best rounds: the project's faster dtype
over the reference. --lax_variants adds the project's step with XLA's convolutions (the DenseNet
before its CPU matmul path). --stages adds each DenseNet stage alone, forward and backward, in
both frameworks, and a per-stage ratio table. Sharing one process slowed both frameworks, the JAX
step most (its best round 23.4 against 32.3 crops/s alone; PyTorch's 48.7 against 58.5), so
workers it is.

Process settings, printed in the first line, apply to every worker: glibc malloc keeps freed
memory mapped (isimed.runtime.tune_malloc; both step faster: neither page-faults its large
buffers in every step) and OMP_WAIT_POLICY=PASSIVE (torch's OpenMP threads sleep at barriers
instead of spinning, which collapses when other processes share the cores).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time

from absl import app
from absl import flags

flags.DEFINE_integer("crops", 128, "Crops of 32^3 per step (a multiple of 8: 8 images x crops/8).")
flags.DEFINE_integer("rounds", 3, "Timed rounds; each round times every variant once, in turn.")
flags.DEFINE_integer("steps", 2, "Steps per variant per round.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "The project's compute dtypes to time.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: os.cpu_count()).")
flags.DEFINE_integer("crop_size", 32, "Crop edge (voxels).")
flags.DEFINE_bool("skip_reference", False, "Time only the project's step (no torch needed).")
flags.DEFINE_bool(
    "stages",
    False,
    "Also time each DenseNet stage alone, forward and backward, in both frameworks (float32): "
    "the stem, then each dense block with its transition (the last with the final BatchNorm).",
)
flags.DEFINE_bool(
    "lax_variants",
    False,
    "Also time the project's step with XLA's convolutions and pools "
    "(the DenseNet before its CPU matmul path).",
)
flags.DEFINE_string(
    "omp_wait_policy",
    "PASSIVE",
    "OMP_WAIT_POLICY for torch's OpenMP threads, set before "
    "torch is imported ('' leaves libgomp's default, ACTIVE spinning, which on a shared "
    "2-core machine made the reference step ~10x slower).",
)
flags.DEFINE_bool(
    "tune_malloc",
    True,
    "Call isimed.runtime.tune_malloc() first in every worker process.",
)
FLAGS = flags.FLAGS

SCALE = 100.0  # mm per unit of embedding distance, as the paper preset's loss.scale.


def reference_step(crops: int, size: int, threads: int):
    """The authors' step; returns (run one step, description)."""
    import monai
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1024)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((crops, 1, size, size, size), generator=gen) * 2 - 1
    centres = torch.rand((crops, 3), generator=gen) * 200 - 100
    target = torch.cdist(centres, centres) / SCALE

    def step():
        opt.zero_grad(set_to_none=True)
        z = net(x)
        loss = F.mse_loss(torch.cdist(z, z), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        opt.step()
        return loss.item()

    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    desc = (
        f"torch {torch.__version__} + monai {monai.__version__}, {torch.get_num_threads()} threads, "
        f"{params:,} parameters"
    )
    return step, desc


def project_step(crops: int, size: int, dtype: str, lax_convs: bool = False):
    """This project's step (paper preset, overridden shapes); returns (run one step, description).

    ``lax_convs``: build the DenseNet with XLA's convolutions and pools even on the CPU (the path
    before the matmul formulations), by hiding the backend from the model while it is built.
    """
    from unittest import mock

    import jax
    import numpy as np

    from configs import isimed_chest
    from isimed import runtime
    from isimed import train_state
    from isimed.models import densenet
    from isimed.models.layers import cpu_backend

    config = isimed_chest.get_config()  # The paper preset: DenseNet-121 3D, ISImed, AdamW, clip 2.0.
    images = 8 if crops % 8 == 0 else 1
    config.data.crop_size = (size,) * 3
    config.data.images_per_batch, config.data.crops_per_image = images, crops // images
    config.model.dtype = dtype
    config.total_steps = 1000
    with mock.patch.object(densenet, "cpu_backend", lambda: False) if lax_convs else contextlib.nullcontext():
        setup = train_state.create_train_step(config, runtime.make_mesh())
    rng = np.random.default_rng(0)
    batch = {
        "crops": rng.uniform(-1, 1, (images, crops // images, size, size, size, 1)).astype(np.float32),
        "centres": rng.uniform(-100, 100, (images, crops // images, 3)).astype(np.float32),
    }
    batch = jax.device_put(batch, setup.data_sharding)
    holder = {"state": setup.state}

    def step():
        holder["state"], metrics = setup.step(holder["state"], batch)
        return float(metrics.compute()["loss"])

    params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.state["params"]["encoder"]))
    convs = "matmul (CPU path)" if cpu_backend() and not lax_convs else "lax (XLA)"
    desc = (
        f"jax {jax.__version__} ({jax.default_backend()}), {config.model.name} {dtype}, "
        f"{params:,} parameters, convolutions: {convs}"
    )
    return step, desc


STAGES = ("stem", "block1", "block2", "block3", "block4")


def _stage_input_shape(stage: str, crops: int, size: int) -> tuple[int, ...]:
    """Channels-last input of a DenseNet-121 stage for crops of size^3: the stem halves the edge
    and its pool halves it again; each transition halves it and the channels."""
    if stage == "stem":
        return (crops, size, size, size, 1)
    i = STAGES.index(stage) - 1
    edge, channels = size // 4 // 2**i, 64 * 2**i
    return (crops, edge, edge, edge, channels)


def reference_stage(stage: str, crops: int, size: int, threads: int):
    """One stage of MONAI's DenseNet121, forward and backward of the sum of squares of its output
    (the input's gradient too, except for the stem's crops); returns (run it once, description)."""
    import monai
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    f = monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1024).features.train()
    module = {
        "stem": torch.nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0),
        "block1": torch.nn.Sequential(f.denseblock1, f.transition1),
        "block2": torch.nn.Sequential(f.denseblock2, f.transition2),
        "block3": torch.nn.Sequential(f.denseblock3, f.transition3),
        "block4": torch.nn.Sequential(f.denseblock4, f.norm5),
    }[stage]
    shape = _stage_input_shape(stage, crops, size)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    x = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(stage != "stem")

    def run():
        for param in module.parameters():
            param.grad = None
        x.grad = None
        y = module(x)
        loss = (y * y).sum()
        loss.backward()
        return loss.item()

    return run, f"torch {torch.__version__} + monai {monai.__version__}, {stage}, input {tuple(x.shape)}"


def project_stage(stage: str, crops: int, size: int):
    """The same stage of this project's DenseNet-121 (float32, the CPU path where JAX runs on the
    CPU), jitted; returns (run it once, description)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from isimed import models

    encoder = models.create_encoder("densenet121", spatial_dims=3, embed_dim=1024, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    shape = _stage_input_shape(stage, crops, size)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))

    def loss(state, x):
        model = nnx.merge(graphdef, state)
        if stage == "stem":
            y = model.stem_features(x)
        else:
            y = model.stages[STAGES.index(stage) - 1](x)
            if stage == "block4":
                y = model.final_bn(y)
        return jnp.sum(y * y)

    grad = jax.jit(jax.value_and_grad(loss, argnums=0 if stage == "stem" else (0, 1)))

    def run():
        value, grads = grad(state, x)
        jax.block_until_ready(grads)
        return float(value)

    return run, f"jax {jax.__version__} ({jax.default_backend()}), {stage}, input {shape}"


_BUILDERS = {
    "reference": reference_step,
    "project": project_step,
    "reference_stage": reference_stage,
    "project_stage": project_stage,
}


def _worker(conn, kind: str, args: tuple, tune: bool) -> None:
    """One variant in its own process: build it, then run (and time) steps when the parent asks."""
    if tune:
        from isimed import runtime

        runtime.tune_malloc()  # Before torch or JAX start threads.
    step, desc = _BUILDERS[kind](*args)
    t0 = time.perf_counter()
    loss = step()  # Warm-up: compiles (JAX) and allocates.
    conn.send((desc, time.perf_counter() - t0, loss))
    while (steps := conn.recv()) is not None:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        conn.send(time.perf_counter() - t0)


def main(argv):
    del argv
    import multiprocessing

    if FLAGS.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy  # Inherited by the workers.
    threads = FLAGS.threads or os.cpu_count()
    crops, size = FLAGS.crops, FLAGS.crop_size
    print(
        f"DenseNet-121 3D train step, {crops} crops of {size}^3 per step; {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}, "
        f"glibc malloc tuned: {FLAGS.tune_malloc}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}; one process per variant",
        flush=True,
    )

    specs = {}  # name -> (kind, arguments)
    if not FLAGS.skip_reference:
        specs["reference (PyTorch + MONAI) float32"] = ("reference", (crops, size, threads))
    for dtype in FLAGS.dtypes:
        specs[f"project (JAX) {dtype}"] = ("project", (crops, size, dtype))
        if FLAGS.lax_variants:
            specs[f"project (JAX) {dtype}, lax convs"] = ("project", (crops, size, dtype, True))
    if FLAGS.stages:
        for stage in STAGES:
            if not FLAGS.skip_reference:
                specs[f"{stage}: reference float32"] = ("reference_stage", (stage, crops, size, threads))
            specs[f"{stage}: project float32"] = ("project_stage", (stage, crops, size))

    context = multiprocessing.get_context("spawn")  # Fresh interpreters: no inherited threads.
    workers = {}
    compile_s = {}
    for name, (kind, args) in specs.items():  # Warm-ups one at a time, each alone on the cores.
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, kind, args, FLAGS.tune_malloc), daemon=True)
        process.start()
        desc, compile_s[name], loss = parent.recv()
        workers[name] = (process, parent)
        print(f"{name}: {desc}\n  warm-up step {compile_s[name]:.1f} s, loss {loss:.4f}", flush=True)

    rates = {name: [] for name in specs}
    for r in range(FLAGS.rounds):
        for name, (_, conn) in workers.items():
            time.sleep(0.5)  # Lets the previous worker's threads go idle.
            conn.send(FLAGS.steps)
            rates[name].append(crops * FLAGS.steps / conn.recv())
            print(f"  round {r + 1}/{FLAGS.rounds} {name}: {rates[name][-1]:.1f} crops/s", flush=True)
    for process, conn in workers.values():
        conn.send(None)
        process.join()

    print(
        f"\n{crops} crops of {size}^3 per step, {FLAGS.rounds} rounds x {FLAGS.steps} steps, "
        f"load average at end {os.getloadavg()[0]:.1f}"
    )
    print(f"{'variant':<48} {'warm-up s':>10} {'best crops/s':>13} {'median crops/s':>15}")
    for name, rs in rates.items():
        print(f"{name:<48} {compile_s[name]:>10.1f} {max(rs):>13.1f} {statistics.median(rs):>15.1f}")
    if FLAGS.stages and not FLAGS.skip_reference:
        print("\nper stage, forward + backward (best rounds): ms per step, project / reference crops/s")
        for stage in STAGES:
            ref, proj = max(rates[f"{stage}: reference float32"]), max(rates[f"{stage}: project float32"])
            print(
                f"  {stage:<7} reference {crops / ref * 1e3:7.0f} ms  project {crops / proj * 1e3:7.0f} ms  "
                f"ratio {proj / ref:.2f}"
            )
    project = [max(rs) for name, rs in rates.items() if name.startswith("project") and "lax" not in name]
    reference = [max(rs) for name, rs in rates.items() if name.startswith("reference")]
    if project and reference:
        print(f"ratio (project / reference crops/s): {max(project) / reference[0]:.2f}")


if __name__ == "__main__":
    app.run(main)
