"""Train-step benchmark: crops/s and compile time per encoder, dtype and device count.

python -m benchmarks.train_step [--steps=3] [--skip_densenet] [--methods=isimed,simclr,vicreg,barlow]

Each device count runs in its own process (8 devices are simulated on the CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=8 unless real accelerators are present). The last
table times the ISImed loss alone (forward + backward) against a whole train step at 1024 crops.

FLOPs (DenseNet rows): "XLA GFLOP" is XLA's cost analysis of the compiled step (every HLO op, the
per-device program times the devices);
"model GFLOP" is 3x the analytic forward count of benchmarks/flops.py (1 MAC = 2 FLOPs, 1.343
GFLOP per 32^3 crop for DenseNet-121 3D); MFU is model FLOP/s over the devices' dense peak where
known (benchmarks.flops.PEAK_FLOPS, e.g. H200 bf16 989 TFLOP/s; n/a on CPUs, or set --peak_tflops).
With --tune_malloc (default) each worker first calls isimed.runtime.tune_malloc().
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from benchmarks import flops

flags.DEFINE_integer("steps", 3, "Timed steps per variant (after one compile step).")
flags.DEFINE_bool("skip_densenet", False, "Leave out DenseNet-121 (slow on CPU).")
flags.DEFINE_integer("densenet_crops", 128, "Crops per DenseNet-121 step (8 images x crops/8).")
flags.DEFINE_list(
    "methods",
    ["isimed"],
    "Methods to time (configs/isimed_chest.py:demo,method=M; same crops through the "
    "encoder per step: two-view methods take half the positions, twice).",
)
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for the MFU column (0: known GPUs only).")
flags.DEFINE_bool(
    "tune_malloc",
    True,
    "Workers call isimed.runtime.tune_malloc() first (glibc keeps freed memory mapped; see that module).",
)
flags.DEFINE_integer("worker_devices", 0, "Internal: run the variants in this process and print JSON.")
FLAGS = flags.FLAGS

# name, model, crop, crops per step (B x K), embed dim
VARIANTS = [
    ("small_cnn 2D 32^2", "small_cnn", (32, 32), (8, 16), 128),
    ("small_cnn 3D 16^3", "small_cnn", (16, 16, 16), (8, 16), 128),
    ("small_cnn 3D 32^3", "small_cnn", (32, 32, 32), (8, 16), 128),
    ("densenet121 3D 32^3", "densenet121", (32, 32, 32), (8, 16), 1024),
]


def _time_step(name, model_name, crop, bk, embed_dim, dtype, steps, method="isimed"):
    import importlib

    import jax
    import numpy as np

    from isimed import methods
    from isimed import runtime
    from isimed import train_state

    config = importlib.import_module("configs.isimed_chest").get_config(f"demo,method={method}")
    views = methods.get(config.method).views
    config.data.crop_size = crop
    config.data.images_per_batch, config.data.crops_per_image = bk[0], bk[1]
    config.model.name, config.model.embed_dim, config.model.dtype = model_name, embed_dim, dtype
    config.total_steps = 1000
    setup = train_state.create_train_step(config, runtime.make_mesh())
    state, step = setup.state, setup.step
    rng = np.random.default_rng(0)
    positions = (bk[0], bk[1] // views)
    batch = {
        "crops": rng.uniform(-1, 1, (*positions, *crop, 1)).astype(np.float32),
        "centres": rng.uniform(-100, 100, (*positions, len(crop))).astype(np.float32),
    }
    if views == 2:
        batch["views"] = rng.uniform(-1, 1, (*positions, *crop, 1)).astype(np.float32)
    batch = jax.device_put(batch, setup.data_sharding)
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)  # Warm-up.
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    row = {
        "variant": name,
        "method": method,
        "dtype": dtype,
        "devices": jax.device_count(),
        "compile_s": compile_s,
        "step_ms": step_s * 1e3,
        "crops_per_s": bk[0] * bk[1] / step_s,
        "xla_flops": None,
    }
    xla = flops.xla_flops(step)  # Of the per-device (SPMD-partitioned) program.
    if xla is not None:
        row["xla_flops"] = xla * jax.device_count()
    if model_name == "densenet121":
        model_flops = 3 * flops.densenet121_forward_flops(crop, embed_dim)[1] * bk[0] * bk[1]
        peak = FLAGS.peak_tflops * 1e12 or flops.peak_flops(jax.devices()[0].device_kind, dtype)
        # Which peak the MFU is of: float32 steps run as TF32, so theirs is the TF32 peak.
        arithmetic = "--peak_tflops" if FLAGS.peak_tflops else flops.ARITHMETIC[dtype]
        row.update(
            model_flops=model_flops,
            mfu=flops.mfu(model_flops, step_s, peak, jax.device_count()),
            peak=None if peak is None else f"{arithmetic} {peak / 1e12:g}",
            device_kind=jax.devices()[0].device_kind,
        )
    return row


def _time_loss_share(steps):
    """The distance loss alone vs a whole small_cnn step, both at 1024 crops (32 images x 32)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from isimed import losses

    rng = np.random.default_rng(0)
    rows = []
    for dim in (128, 1024):
        z = jnp.asarray(rng.normal(size=(32, 32, dim)), jnp.float32)
        p = jnp.asarray(rng.uniform(-100, 100, (32, 32, 3)), jnp.float32)
        f = jax.jit(jax.grad(lambda z, p=p: losses.isimed_loss(z, p, scale=100.0, pairs="all")[0]))
        jax.block_until_ready(f(z))
        t0 = time.perf_counter()
        for _ in range(steps * 3):
            g = f(z)
        jax.block_until_ready(g)
        rows.append(
            {
                "what": f"ISImed loss fwd+bwd, 1024 crops, D={dim}",
                "ms": (time.perf_counter() - t0) / (steps * 3) * 1e3,
            }
        )
    step = _time_step("small_cnn 3D 16^3", "small_cnn", (16, 16, 16), (32, 32), 128, "float32", steps)
    rows.append({"what": "whole train step, small_cnn 3D 16^3, 1024 crops, D=128", "ms": step["step_ms"]})
    return rows


def _worker(devices):
    if FLAGS.tune_malloc:
        from isimed import runtime

        runtime.tune_malloc()  # Before JAX starts its threads.
    # One line per measurement as soon as it exists, so a slow variant loses nothing before it.
    if devices == 1:
        for row in _time_loss_share(FLAGS.steps):
            print("LOSS " + json.dumps(row), flush=True)
    for name, model, crop, bk, dim in VARIANTS:
        if model == "densenet121":
            if FLAGS.skip_densenet:
                continue
            bk = (8, FLAGS.densenet_crops // 8)
        for method in FLAGS.methods:
            for dtype in ("float32", "bfloat16"):
                row = _time_step(f"{name} x{bk[0] * bk[1]}", model, crop, bk, dim, dtype, FLAGS.steps, method)
                print("STEP " + json.dumps(row), flush=True)


def main(argv):
    del argv
    if FLAGS.worker_devices:
        return _worker(FLAGS.worker_devices)
    import jax  # Only to see whether accelerators are present; workers set their own flags.

    rows, loss_rows = [], []
    for devices in (1, 8):
        env = dict(os.environ)
        if jax.default_backend() == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        elif devices > jax.device_count():
            continue
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            f"--worker_devices={devices}",
            f"--steps={FLAGS.steps}",
            f"--skip_densenet={FLAGS.skip_densenet}",
            f"--densenet_crops={FLAGS.densenet_crops}",
            f"--methods={','.join(FLAGS.methods)}",
            f"--peak_tflops={FLAGS.peak_tflops}",
            f"--tune_malloc={FLAGS.tune_malloc}",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            kind, _, payload = line.partition(" ")
            if kind in ("STEP", "LOSS"):
                (rows if kind == "STEP" else loss_rows).append(json.loads(payload))
                print(line.strip(), flush=True)
        proc.wait()

    print(
        f"\nTrain step ({jax.default_backend()}, {os.cpu_count()} CPU cores; "
        f"mean of {FLAGS.steps} steps after compile and one warm-up step; glibc malloc tuned: "
        f"{FLAGS.tune_malloc})"
    )
    print(
        f"{'variant':<27} {'method':<8} {'dtype':<9} {'devices':>7} {'compile s':>10} {'step ms':>10} "
        f"{'crops/s':>9} {'vs f32':>7} {'vs isimed':>9}"
    )
    key = lambda r: (r["variant"], r["devices"])
    f32 = {(*key(r), r["method"]): r["step_ms"] for r in rows if r["dtype"] == "float32"}
    isimed = {(*key(r), r["dtype"]): r["step_ms"] for r in rows if r["method"] == "isimed"}
    for r in rows:
        vs_f32 = f32.get((*key(r), r["method"]), float("nan")) / r["step_ms"]
        vs_isimed = r["step_ms"] / isimed.get((*key(r), r["dtype"]), float("nan"))
        print(
            f"{r['variant']:<27} {r['method']:<8} {r['dtype']:<9} {r['devices']:>7} "
            f"{r['compile_s']:>10.1f} {r['step_ms']:>10.1f} {r['crops_per_s']:>9.0f} "
            f"{vs_f32:>6.2f}x {vs_isimed:>8.2f}x"
        )
    dense = [r for r in rows if "model_flops" in r]
    if dense:
        convs, with_head = flops.densenet121_forward_flops()
        print(
            f"\nFLOPs (DenseNet-121 3D forward per 32^3 crop, analytic, 1 MAC = 2 FLOPs: convolutions "
            f"{convs / 1e9:.3f} GFLOP, with the Linear head {with_head / 1e9:.3f}; model FLOPs per step = "
            f"3 x forward x crops)"
        )
        print(
            f"{'variant':<27} {'method':<8} {'dtype':<9} {'devices':>7} {'XLA GFLOP':>10} "
            f"{'model GFLOP':>12} {'XLA/model':>9} {'TFLOP/s':>8} {'MFU':>6}  of peak TFLOP/s"
        )
        for r in dense:
            xla = r["xla_flops"]
            achieved = r["model_flops"] / (r["step_ms"] / 1e3)
            print(
                f"{r['variant']:<27} {r['method']:<8} {r['dtype']:<9} {r['devices']:>7} "
                f"{xla / 1e9 if xla else float('nan'):>10.1f} {r['model_flops'] / 1e9:>12.1f} "
                f"{xla / r['model_flops'] if xla else float('nan'):>9.2f} {achieved / 1e12:>8.3f} "
                f"{format(r['mfu'], '.1%') if r['mfu'] is not None else 'n/a':>6}  {r['peak'] or ''}"
            )
        if any(r["mfu"] is None for r in dense):
            print(f"MFU n/a: no known peak for {dense[0]['device_kind']!r} (set --peak_tflops)")
    print("\nDistance-loss share")
    for r in loss_rows:
        print(f"{r['what']:<58} {r['ms']:>9.1f} ms")
    if len(loss_rows) == 3:
        print(f"loss (D=128) / whole step: {loss_rows[0]['ms'] / loss_rows[2]['ms']:.1%}")


if __name__ == "__main__":
    app.run(main)
