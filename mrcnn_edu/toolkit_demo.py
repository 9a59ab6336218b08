"""Fit a tiny conv net to synthetic shapes with the explicit-autograd toolkit.

The smallest end-to-end use of every piece: layers with forward/backward, the cross-entropy
loss and its gradient, SGD with warm-up, and a weights file. It is what ``mrcnn-edu demo
--toolkit`` runs, and the pattern the Mask R-CNN trainer follows at a larger scale:

    logits = net.forward(x)                       # forward, caches kept in each layer
    loss, dlogits = softmax_cross_entropy(...)    # loss and its gradient
    net.zero_grad(); net.backward(dlogits)        # gradients flow back layer by layer
    opt.step()                                    # and the parameters move
"""

from __future__ import annotations

import os

import numpy as np

from . import weights
from .data.shapes import SHAPE_KINDS, toy_classification
from .nn import layers as L
from .nn.losses import softmax_cross_entropy
from .nn.optim import SGD, WarmupMultiStepLR
from .progress import progress_bar


def tiny_convnet(rng: np.random.Generator, size: int = 20) -> L.Sequential:
    """conv3x3(1->8) ReLU maxpool2 conv3x3(8->16) ReLU maxpool2 flatten linear(->3)."""
    return L.Sequential(
        L.Conv2d(1, 8, 3, padding=1, rng=rng),
        L.ReLU(),
        L.MaxPool2d(2),
        L.Conv2d(8, 16, 3, padding=1, rng=rng),
        L.ReLU(),
        L.MaxPool2d(2),
        L.Flatten(),
        L.Linear(16 * (size // 4) ** 2, len(SHAPE_KINDS), rng=rng),
    )


def run(
    out_dir: str = "runs/toolkit_demo",
    steps: int = 300,
    batch_size: int = 32,
    seed: int = 0,
    log_every: int = 25,
    progress: bool = True,
) -> dict:
    """Train, print the loss as it falls, evaluate on held-out images, save weights and a plot.

    Returns ``{"losses": [...], "accuracy": float, "weights": path, "plot": path or None}``.
    """
    rng = np.random.default_rng(seed)
    x_train, y_train = toy_classification(2000, rng=rng)
    x_test, y_test = toy_classification(500, rng=rng)
    net = tiny_convnet(rng)
    opt = SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = WarmupMultiStepLR(
        opt, base_lr=0.05, milestones=[int(steps * 0.8)], warmup_iters=min(50, steps // 5)
    )
    losses = []
    bar = progress_bar(steps, "toolkit demo", "step") if progress else None
    for step in range(steps):
        idx = rng.integers(0, len(x_train), size=batch_size)
        logits = net.forward(x_train[idx])
        loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
        net.zero_grad()
        net.backward(dlogits)
        opt.step()
        sched.step()
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        elif (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1:4d}/{steps}  loss {np.mean(losses[-log_every:]):.4f}")
    if bar is not None:
        bar.close()
    net.eval()
    accuracy = float(np.mean(net.forward(x_test).argmax(axis=1) == y_test))
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, "tiny_convnet.npz")
    weights.save(weights_path, net.state_dict())
    plot_path = _plot(losses, os.path.join(out_dir, "loss.png"))
    first, last = np.mean(losses[:log_every]), np.mean(losses[-log_every:])
    print(
        f"loss {first:.3f} -> {last:.3f}; held-out accuracy {accuracy:.1%} on {len(y_test)} images"
    )
    print(f"weights: {weights_path}" + (f"; loss curve: {plot_path}" if plot_path else ""))
    return {"losses": losses, "accuracy": accuracy, "weights": weights_path, "plot": plot_path}


def _plot(losses: list[float], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no loss plot; pip install 'mrcnn-edu[demo]')")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, alpha=0.5, label="per step")
    k = 25
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(losses)), smooth, lw=2, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="cross-entropy", title="tiny conv net on synthetic shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
