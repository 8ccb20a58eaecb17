"""Cross-layer transcoder decoding: dense vs sparse decode step time (forward + backward), on CPU.

A ``clt`` dictionary (default: L 8 layers, F 2048 latents per layer, d 576, TopK k 32 per layer, so 1.6% of
the latents active) decodes a batch of 1024 tokens through each path of
:meth:`CrossLayerTranscoder.decode_sparse` / :meth:`decode_dense`: the sparse path gathers each source
layer's active latents and sums their decoder rows into the target layers (``F.embedding_bag``, work
proportional to the active (latent, target) pairs); the dense path multiplies ``[batch, F]`` by
``[F, (L - i) d]`` per source layer (work proportional to ``L(L+1)/2 * F``). The step is the decode, a
squared-error loss against random targets and its backward (gradients of every decoder block and of the
latent values); the encoder and selection run once, outside the timed step. Prints the median step time
of each path, their ratio, and the largest difference between their reconstructions.

    .venv/bin/python bench/clt_decode.py [--layers 8] [--d_sae 2048] [--d 576] [--k 32] [--batch 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from saelab import SiteSpec
from saelab.dictionary import build_dictionary


def main() -> None:
    """Parse arguments, time both paths, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d_sae", type=int, default=2048, help="latents per layer (F)")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32, help="TopK latents per layer and token")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L, d = args.layers, args.d
    torch.manual_seed(0)
    sites = SiteSpec([f"layers.{i}.mlp.input" for i in range(L)], [f"layers.{i}.mlp" for i in range(L)], d, d)
    module = build_dictionary("clt", sites, {"d_sae": args.d_sae, "k": args.k, "activation": "topk"})
    x = torch.randn(args.batch, L, d)
    y = torch.randn(args.batch, L, d)
    with torch.no_grad():
        xl = x.transpose(0, 1).contiguous()
        selected = module._select(module._preacts(xl))
    decoders = [module.decoder(i) for i in range(L)]

    def step(path: str) -> tuple[float, torch.Tensor]:
        codes = module._codes(xl, selected, args.batch)
        values = [c.values.detach().requires_grad_() for c in codes]
        for c, v in zip(codes, values, strict=True):
            c.values = v
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if path == "sparse":
            recon = module.decode_sparse(codes)
        else:
            recon = module.decode_dense(torch.stack([c.dense() for c in codes], dim=1))
        loss = (recon - y).pow(2).sum(-1).mean()
        loss.backward()
        seconds = time.perf_counter() - start
        assert all(W.grad is not None for W in decoders) and all(v.grad is not None for v in values)
        return seconds, recon.detach()

    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for path in ("dense", "sparse"):
            seconds, outputs[path] = step(path)
            times[path].append(seconds)
    nnz = sum(int(r.numel()) for r, _, _, _ in selected)
    pairs = sum(args.batch * args.k * (L - i) for i in range(L))
    dense_ms, sparse_ms = (statistics.median(times[p]) * 1e3 for p in ("dense", "sparse"))
    diff = float((outputs["dense"] - outputs["sparse"]).abs().max())
    print(f"clt decode, L={L} F={args.d_sae} d={d} k={args.k} per layer, batch {args.batch}, "
          f"{torch.get_num_threads()} threads: density {nnz / (args.batch * L * args.d_sae):.2%}, "
          f"{pairs:,} active (latent, target) pairs")
    print(f"dense  decode step (fwd+bwd): {dense_ms:8.1f} ms (median of {args.repeats})")
    print(f"sparse decode step (fwd+bwd): {sparse_ms:8.1f} ms (median of {args.repeats})")
    print(f"dense / sparse: {dense_ms / sparse_ms:.2f}x; max |dense - sparse| reconstruction: {diff:.2e}")


if __name__ == "__main__":
    main()
