"""Why a seeded run repeats at one thread count and not across them: one training step, compared bit for bit.

Builds the default SmallCNN (seed 0), takes one batch of 128 random 28x28 images, and computes the loss
and every parameter's gradient once per thread count (the same dropout draw each time), then once more at
the first count. Prints, per thread count, how many gradients are bit-identical to those of the first
count and the largest difference.

    python benchmarks/threads.py [--threads 1 2 4]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rf_callback.demos.cnns import SmallCNN


def step(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, threads: int) -> list[torch.Tensor]:
    """The loss and the gradients of one training step at ``threads`` threads, dropout drawn from seed 1."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    model.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return [loss.detach().clone(), *(p.grad.clone() for p in model.parameters())]


def main(counts: list[int]) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    first = step(model, images, labels, counts[0])
    for threads in [*counts[1:], counts[0]]:
        other = step(model, images, labels, threads)
        same = sum(torch.equal(a, b) for a, b in zip(first, other))
        largest = max(float((a - b).abs().max()) for a, b in zip(first, other))
        print(
            f"{threads} thread(s) vs {counts[0]}: {same} of {len(first)} tensors (loss, gradients) bit-identical,"
            f" largest difference {largest:.2e}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2, 4], help="thread counts, the first the reference"
    )
    main(parser.parse_args().threads)
