"""FLOP counts for the train-step benchmarks: an analytic DenseNet count, XLA's cost analysis and
model-FLOP utilisation.

python -m benchmarks.flops      # prints the DenseNet-121 3D count per layer group for one 32^3 crop

Conventions: 1 multiply-add (MAC) = 2 FLOPs. The analytic count is the network's forward
convolutions (and, separately, its final Linear) as PyTorch/MONAI compute them: every kernel tap
at every output position (including taps over zero padding), transitions' 1^3 convs at full
resolution before their pool. BatchNorm, ReLU, pooling and concatenation are left out (< 1% of the
multiply-adds). A train step's model FLOPs are taken as 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from collections.abc import Sequence

# The tensor-core arithmetic each model dtype's convolutions run in: float32 ones as TF32 (XLA's
# default precision on these GPUs), so a float32 MFU is against the TF32 peak, ~7x the FP32
# (non-tensor-core) figure (H100 SXM: 67 TFLOP/s).
ARITHMETIC = {"bfloat16": "BF16", "float32": "TF32"}
# Dense (no sparsity) tensor-core peak FLOP/s per device kind and arithmetic, from the vendors'
# specifications (H100/H200 SXM; A100 SXM).
PEAK_FLOPS = {
    "NVIDIA H200": {"BF16": 989e12, "TF32": 494.7e12},
    "NVIDIA H100 80GB HBM3": {"BF16": 989e12, "TF32": 494.7e12},
    "NVIDIA A100-SXM4-80GB": {"BF16": 312e12, "TF32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"BF16": 312e12, "TF32": 156e12},
}


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def densenet_forward_macs(
    crop: Sequence[int] = (32, 32, 32),
    in_channels: int = 1,
    init_features: int = 64,
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    bn_size: int = 4,
    embed_dim: int = 1024,
) -> dict[str, int]:
    """Forward multiply-adds of one crop through a DenseNet (default: DenseNet-121, 3D, 32^3), by
    layer group: the 7^d stride-2 stem, each dense block's 1^d bottleneck and 3^d convs, the
    transitions, and the final Linear ("head")."""
    dims = len(crop)
    spatial = [_conv_out(n, 7, 2, 3) for n in crop]  # Stem: 7^d, stride 2, padding 3.
    positions = _prod(spatial)
    macs = {"stem 7^d/2": positions * 7**dims * in_channels * init_features}
    spatial = [_conv_out(n, 3, 2, 1) for n in spatial]  # Max-pool 3, stride 2, padding 1.
    channels = init_features
    hidden = bn_size * growth_rate
    for i, layers in enumerate(block_config):
        positions = _prod(spatial)
        bottleneck = sum(positions * (channels + j * growth_rate) * hidden for j in range(layers))
        macs[f"block {i + 1} 1^d"] = bottleneck
        macs[f"block {i + 1} 3^d"] = layers * positions * 3**dims * hidden * growth_rate
        channels += layers * growth_rate
        if i < len(block_config) - 1:
            macs[f"transition {i + 1}"] = positions * channels * (channels // 2)
            channels //= 2
            spatial = [n // 2 for n in spatial]  # Average pool 2, stride 2.
    macs["head (Linear)"] = channels * embed_dim
    return macs


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def densenet121_forward_flops(
    crop: Sequence[int] = (32, 32, 32), embed_dim: int = 1024
) -> tuple[float, float]:
    """(convolution FLOPs, convolution + Linear FLOPs) of one crop's DenseNet-121 forward pass."""
    macs = densenet_forward_macs(crop, embed_dim=embed_dim)
    convs = sum(v for k, v in macs.items() if not k.startswith("head"))
    return 2.0 * convs, 2.0 * (convs + macs["head (Linear)"])


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled JAX computation by XLA's cost analysis (all HLO ops:
    matmuls and convolutions at 2 per multiply-add, plus elementwise work), or None."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Not every backend implements it.
        return None
    if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per device program.
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s in the arithmetic ``dtype`` runs in (``ARITHMETIC``: the
    TF32 peak for float32) where known (not for CPUs)."""
    return PEAK_FLOPS.get(device_kind, {}).get(ARITHMETIC.get(dtype, ""))


def mfu(model_flops_per_step: float, step_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Model-FLOP utilisation: model FLOPs per second over the devices' summed peak."""
    if peak is None or step_s <= 0:
        return None
    return model_flops_per_step / step_s / (peak * devices)


def main() -> None:
    macs = densenet_forward_macs()
    total = sum(macs.values())
    print("DenseNet-121 3D forward, one 32^3 crop (1 MAC = 2 FLOPs):")
    for name, v in macs.items():
        print(f"  {name:<16} {v / 1e6:9.1f} M MACs  {v / total:6.1%}")
    convs, with_head = densenet121_forward_flops()
    print(f"  convolutions    {convs / 1e9:9.3f} GFLOP; with the Linear head {with_head / 1e9:.3f} GFLOP")
    print(f"  train step (3x forward): {3 * with_head / 1e9:.2f} GFLOP per crop")


if __name__ == "__main__":
    main()
