"""The PyTorch anchor of the train-step benchmark: the same ResNet-18 step, in eager PyTorch.

What a user would write instead of this project, measured on the same batch and CPU as
`benchmarks/train_step.py --models resnet18`: the face ResNet-18 of `facenet_jax.models.resnet`
layer for layer (3×3 stride-1 stem without max-pool, BasicBlocks of widths 64/128/256/512,
2 per stage, each stage's first block strided with a 1×1 conv + BN projection, the last BN of
each residual branch with its scale at zero, global average pooling, BN, a 512→128 linear layer
with bias, L2 normalisation; BN momentum 0.1 = flax's 0.9), the same parameter count, the same
input (uint8 [P·K, size, size, 3] from `numpy.random.default_rng(0)`, mapped to 2x − 1), the
same loss (TF-Addons semi-hard on squared distances, α = 0.2, mean over the positive pairs:
`facenet_jax.losses.triplet_loss(..., strategy="semihard")`'s value) and the same update (Adam,
gradients clipped to global norm 10). One difference: PyTorch pads a strided 3×3 conv by 1 on
each side, flax's "SAME" by 0 before and 1 after; shapes and FLOPs are equal.

The loss mines with a [B, B, B] mask (as pytorch-metric-learning does): meant for the small
batches a CPU can train a ResNet-18 on; it refuses B > 512.

Step time: the fastest of --rounds rounds of --steps steps after one warm-up step (as
train_step.py times its steps); every round's time is kept in the JSON.

--with_jax also builds this project's step for the same model, batch and input
(`train_step.build_step`: float32, one device, `semihard`) in the same process and alternates
the two round by round, so that load from other processes falls on both alike (a shared
machine): each round gives a JAX / PyTorch ratio, and the row reports their median.

    python benchmarks/train_step_torch.py --batches 8x4 --output /tmp/train_step_torch.json
    python benchmarks/train_step_torch.py --batches 8x4 --with_jax --rounds 5 --output /tmp/both.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import train_step  # noqa: E402

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_SIZES = (2, 2, 2, 2)
EMBEDDING_DIM = 128
MARGIN = 0.2
CLIP_NORM = 10.0
LEARNING_RATE = 3e-3
MAX_BATCH = 512  # the [B, B, B] mining mask: 512³ booleans are 128 MB


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="8x4", help="P×K list, e.g. 8x4,16x4")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's own choice)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the fastest counts")
    parser.add_argument("--with_jax", action="store_true",
                        help="alternate rounds with this project's JAX step (see above)")
    parser.add_argument("--output", required=True, help="JSON file to write (a new path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    args.layouts = [train_step.parse_layout(text) for text in args.batches.split(",")]
    for p, k in args.layouts:
        if p * k > MAX_BATCH:
            parser.error(f"batch {p}×{k} = {p * k} is above {MAX_BATCH}: the [B, B, B] mining "
                         "mask would not fit; choose a smaller P×K")
    if args.image_size < 16:
        parser.error(f"--image_size {args.image_size} is below 16 px: the four strided stages "
                     "need at least 16")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if pathlib.Path(args.output).exists() and not args.overwrite:
        parser.error(f"{args.output} exists; give a new --output or pass --overwrite")
    return args


def build_model() -> Any:
    """The face ResNet-18: images [N, 3, H, W] in [-1, 1] -> unit embeddings [N, 128]."""
    import torch
    from torch import nn

    def bn(channels: int, zero_scale: bool = False) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
        if zero_scale:
            nn.init.zeros_(norm.weight)
        return norm

    def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
        layer = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        return layer

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, width, 3, stride), bn(width)
            self.conv2, self.bn2 = conv(width, width, 3, 1), bn(width, zero_scale=True)
            self.shortcut = (nn.Identity() if cin == width and stride == 1 else
                             nn.Sequential(conv(cin, width, 1, stride), bn(width)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class FaceResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv(3, STAGE_WIDTHS[0], 3, 1), bn(STAGE_WIDTHS[0]),
                                      nn.ReLU())
            blocks, cin = [], STAGE_WIDTHS[0]
            for width, size in zip(STAGE_WIDTHS, STAGE_SIZES):
                for index in range(size):
                    blocks.append(BasicBlock(cin, width, 2 if index == 0 else 1))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.head_bn = nn.BatchNorm1d(cin, eps=1e-5, momentum=0.1)
            self.embedding = nn.Linear(cin, EMBEDDING_DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.blocks(self.stem(x)).mean(dim=(2, 3))
            return nn.functional.normalize(self.embedding(self.head_bn(features)), dim=1)

    return FaceResNet18()


def semihard_loss(embeddings: Any, labels: Any, margin: float = MARGIN) -> Any:
    """TF-Addons semi-hard on squared distances: for each positive pair (a, p), the closest
    negative strictly farther than p, else the farthest negative; hinge, mean over the pairs.
    embeddings [B, D] unit, labels [B] -> scalar. Mined on detached distances, as TF-Addons."""
    import torch

    squares = embeddings.square().sum(dim=1)
    distances = (squares[:, None] + squares[None, :] - 2 * embeddings @ embeddings.T).clamp(min=0)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    negative = ~same
    mined = distances.detach()
    # farther[a, p, n]: n is a negative of a strictly farther from a than p is.
    farther = negative[:, None, :] & (mined[:, None, :] > mined[:, :, None])
    inf = torch.tensor(float("inf"))
    closest_farther = torch.where(farther, mined[:, None, :], inf).argmin(dim=2)
    farthest = torch.where(negative, mined, -inf).argmax(dim=1, keepdim=True)
    chosen = torch.where(farther.any(dim=2), closest_farther, farthest.expand_as(closest_farther))
    d_an = distances.gather(1, chosen)  # [a, p] -> d(a, the negative chosen for (a, p))
    hinge = torch.relu(distances - d_an + margin)
    return hinge[positive].mean()


def build_step(p: int, k: int, size: int) -> tuple[Any, Any, Any]:
    """(step, images uint8 [P·K, 3, size, size], labels [P·K]); step(images, labels) -> loss."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = build_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (p * k, size, size, 3), dtype=np.uint8)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.repeat(np.arange(p), k))

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 * 2.0 - 1.0
        loss = semihard_loss(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        return loss.detach()

    return step, images, labels


def time_torch_round(step: Any, images: Any, labels: Any, steps: int) -> tuple[float, float]:
    """(seconds per step over `steps` calls, the last loss)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, labels)
    loss = float(loss)
    return (time.perf_counter() - start) / steps, loss


def measure(p: int, k: int, size: int, steps: int, rounds: int, with_jax: bool = False
            ) -> dict:
    """One row: the fastest round's seconds per step, every round's, images/s; with_jax: the
    same for this project's step, timed in alternating rounds, and the per-round ratios."""
    step, images, labels = build_step(p, k, size)
    step(images, labels)  # warm-up: allocator, Adam's moments
    jax_step = jax_round_s = None
    if with_jax:
        jax_step, state, jax_images, jax_labels, _, _ = train_step.build_step(
            "resnet18", size, p, k, 1, "float32", "semihard")
        jax_step = jax_step.lower(state, jax_images, jax_labels).compile()
        state, _ = train_step.time_steps(jax_step, state, jax_images, jax_labels, 1)  # warm-up
        jax_round_s = []
    round_s = []
    for _ in range(rounds):
        if with_jax:
            state, seconds = train_step.time_steps(jax_step, state, jax_images, jax_labels, steps)
            jax_round_s.append(seconds)
        seconds, loss = time_torch_round(step, images, labels, steps)
        round_s.append(seconds)
    step_s = min(round_s)
    row = {"model": "resnet18", "image_size": size, "P": p, "K": k, "batch": p * k,
           "steps": steps, "rounds": rounds, "step_s": step_s, "round_s": round_s,
           "images_per_s": p * k / step_s, "final_loss": loss}
    if with_jax:
        ratios = [j / t for j, t in zip(jax_round_s, round_s)]
        row.update(jax_step_s=min(jax_round_s), jax_round_s=jax_round_s,
                   jax_over_torch_per_round=ratios,
                   jax_over_torch_median=statistics.median(ratios))
    return row


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {"framework": "torch", "torch": torch.__version__, "with_jax": args.with_jax,
              "threads": torch.get_num_threads(), "host": train_step.host_description(),
              "load_average": os.getloadavg(), "argv": argv, "rows": []}
    if args.with_jax:
        import jax
        report["jax"] = jax.__version__
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for p, k in args.layouts:
        print(f"... torch resnet18 {args.image_size}px P×K={p}×{k}", flush=True)
        row = measure(p, k, args.image_size, args.steps, args.rounds, args.with_jax)
        report["rows"].append(row)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"| resnet18 | {args.image_size} | {p}×{k} | torch {torch.__version__}, "
              f"{report['threads']} threads | {1000 * row['step_s']:.1f} ms | "
              f"{row['images_per_s']:.1f} images/s |", flush=True)
        if args.with_jax:
            print(f"  JAX {1000 * row['jax_step_s']:.1f} ms; JAX / PyTorch per round "
                  f"{[round(r, 3) for r in row['jax_over_torch_per_round']]}, median "
                  f"{row['jax_over_torch_median']:.3f}", flush=True)
    print(f"wrote {output}")
    return report["rows"]


if __name__ == "__main__":
    main(sys.argv[1:])
