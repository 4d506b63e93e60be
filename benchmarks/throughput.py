"""Training-step time of minidit's DiT and ViT beside diffusers' and transformers' versions.

Each pair is built with random weights and the same width, depth, heads and token count;
one training step is a forward pass, a loss and a backward pass on a fixed batch. The two
models of a pair are timed in alternating rounds (so that load from other processes hits
both alike), and the median step time of each is reported with their ratio:

    ratio = minidit time / peer time           (< 1: minidit is faster)
    achieved TFLOP/s = 3 * 2 * MACs(forward) * batch / step time   (backward ~ 2 forwards)

Usage (the peers come with the `bench` extra: pip install -e ".[bench]"):
    python benchmarks/throughput.py                              # CPU, MNIST-sized models
    python benchmarks/throughput.py --device cuda --bf16 --compile --batch-size 256 \\
        --dit-config DiT-S/2 --vit-config vit-cifar10 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from minidit.dit import DIT_CONFIGS, make_dit
from minidit.device import cpu_name
from minidit.flops import count_macs, count_params
from minidit.vit import VIT_CONFIGS, make_vit


def dit_pair(name: str, batch: int, device: torch.device):
    """minidit's DiT and diffusers' DiTTransformer2DModel of the same shape, a step for each."""
    from diffusers import DiTTransformer2DModel

    c = DIT_CONFIGS[name]
    ours = make_dit(name).to(device)
    peer = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
        sample_size=c.input_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes,
        activation_fn="gelu-approximate", norm_type="ada_norm_zero",
    ).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, c.num_classes, (batch,), generator=g).to(device)
    target = torch.randn(batch, c.out_channels, c.input_size, c.input_size, generator=g).to(device)
    return {
        "models": {
            "minidit": (ours, lambda m: F.mse_loss(m(x, t, y).float(), target)),
            "diffusers": (peer, lambda m: F.mse_loss(
                m(x, timestep=t, class_labels=y, return_dict=False)[0].float(), target)),
        },
        "macs": count_macs(ours, x[:1], t[:1], y[:1]),
    }


def vit_pair(name: str, batch: int, device: torch.device):
    """minidit's ViT and transformers' ViTForImageClassification of the same shape."""
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    c = VIT_CONFIGS[name]
    ours = make_vit(name).to(device)
    peer = ViTForImageClassification(HFViTConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=int(c.hidden_size * c.mlp_ratio), image_size=c.image_size,
        patch_size=c.patch_size, num_channels=c.in_channels, num_labels=c.num_classes,
        hidden_act="gelu_pytorch_tanh", attn_implementation="sdpa",
    )).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g).to(device)
    y = torch.randint(0, c.num_classes, (batch,), generator=g).to(device)
    return {
        "models": {
            "minidit": (ours, lambda m: F.cross_entropy(m(x).float(), y)),
            "transformers": (peer, lambda m: F.cross_entropy(m(pixel_values=x).logits.float(), y)),
        },
        "macs": count_macs(ours, x[:1]),
    }


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()



def time_pair(pair: dict, args, device: torch.device) -> dict[str, float]:
    """Median seconds per training step of each model, timed in alternating rounds."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    steps = {}
    for label, (model, loss_fn) in pair["models"].items():
        model.train()
        fn = torch.compile(model) if args.compile else model

        def step(fn=fn, model=model, loss_fn=loss_fn):
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(fn)
            loss.backward()

        for _ in range(args.warmup):
            step()
        steps[label] = step
    times = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[label].append((time.perf_counter() - start) / args.steps)
    return {label: statistics.median(ts) for label, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dit-config", default="dit-mnist-cpu", choices=list(DIT_CONFIGS))
    parser.add_argument("--vit-config", default="vit-mnist", choices=list(VIT_CONFIGS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for kind, build, name in [("DiT", dit_pair, args.dit_config), ("ViT", vit_pair, args.vit_config)]:
        pair = build(name, args.batch_size, device)
        seconds = time_pair(pair, args, device)
        tflops = {k: 6 * pair["macs"] * args.batch_size / s / 1e12 for k, s in seconds.items()}
        (ours, peer) = seconds
        for label in (ours, peer):
            mfu = f"{100 * tflops[label] / args.peak_tflops:.1f}%" if args.peak_tflops else "-"
            rows.append(f"| {kind} {name} | {label} | {count_params(pair['models'][label][0]) / 1e6:.2f} "
                        f"| {1e3 * seconds[label]:.1f} | {args.batch_size / seconds[label]:.0f} "
                        f"| {tflops[label]:.3f} | {mfu} | {seconds[ours] / seconds[label]:.2f} |")
        print("\n".join(rows[-2:]), flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [
        "# Training-step throughput: minidit vs diffusers / transformers",
        "",
        f"Device: {device.type} ({where}), {torch.get_num_threads()} CPU threads, torch "
        f"{torch.__version__}; batch {args.batch_size}, bf16={args.bf16}, compile={args.compile}; "
        f"median of {args.rounds} alternating rounds of {args.steps} steps (forward + loss + backward).",
        "TFLOP/s counts 3 x the forward MACs x 2 of minidit's model (the same shape for both). "
        f"Load average during the run: {os.getloadavg()[0]:.1f} (other processes share the CPU).",
        "",
        "| model | library | params (M) | ms / step | images / s | TFLOP/s | of peak | minidit / this |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Command: `python benchmarks/throughput.py --device {args.device} --batch-size {args.batch_size}"
        f"{f' --threads {args.threads}' if args.threads else ''}"
        f" --dit-config {args.dit_config} --vit-config {args.vit_config}"
        f"{' --bf16' if args.bf16 else ''}{' --compile' if args.compile else ''}`",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
