"""The TNGD paper's Fig. 5 on the emulated device: fine-tuning low-rank adapters (LoRA) of a pre-trained
transformer with TNGD-Adam at three values of t, against Adam and bare TNGD.

    pip install ".[torch,examples]"
    python examples/paper/fig5_finetune.py [--quick] [--out paper_out] [--seeds 0 1 2] [--iters 80]
                                           [--t 0.1 1 10] [--lr 1e-2]

The model and the tasks (generated here; nothing is downloaded).  Sequences of 12 tokens drawn uniformly
from a vocabulary of 8.  A 2-layer pre-norm transformer encoder (width 32, 4 heads, learned positions, GELU
MLP of width 64, mean pooling, a linear head) is pre-trained inside the script with Adam on task A: the
sequence's most frequent token (8 classes, ties to the smallest token), 4,000 sequences, 300 steps of 128.
It is then frozen and fine-tuned on task B, which it was not trained on: is token 1 more frequent than,
as frequent as, or less frequent than token 2 (3 classes; 2,000 training and 1,000 held-out sequences).
Trainable in fine-tuning: rank-4 LoRA adapters W + (alpha / r) B A (A random, B = 0 at the start, alpha = 4)
on the four attention projections (query, key, value, output) of both layers, and a new 3-way head:
N = 2,147 parameters; batches of 32, so the GGN has m = 96 rows.  The pre-trained model is the same for
every seed (pre-training seed 0); the seed draws the adapters, the head, the batches and the device.

Methods, each for every seed on the same initial adapters and batches:
    Adam             torch.optim.Adam(lr 1e-2), the digital baseline
    TNGD             driver.optim.TNGD on tngd-sim, SGD base rule, lr 0.1, t = 10
    TNGD-Adam t=T    the paper's TNGD-Adam: TNGDPreconditioner on tngd-sim (analog time T per step in the
                     units of F) writing the natural gradient into .grad, then torch.optim.Adam(lr 1e-2,
                     betas (0, 0)), for each --t
lambda = 0.01 for both device methods.  The learning rates are the best of {3e-3, 1e-2} for Adam (TNGD-Adam
uses the same) and of {0.03, 0.1} for TNGD, tried on seed 0.  The training loss and accuracies are measured
after every step on fixed subsets of 256 training and 256 held-out sequences (a full pass costs more than a
step).

Scaled down from the paper (DistilBERT with LoRA fine-tuned on SQuAD question answering) because nothing may
be downloaded and a full run should take a few minutes on 2 shared cores (2 measured): a 2-layer width-32 transformer
pre-trained here in seconds, a synthetic transfer task, 80 iterations, 3 seeds.

Writes OUT/fig5_finetune.csv (common.COLUMNS plus "t", the analog time, 0 for Adam) and OUT/fig5_finetune.png
(training loss on task B against iteration, and held-out accuracy: mean over seeds, band from the lowest to
the highest seed), and prints a markdown table (mean ± sd over seeds).  Ctrl-C stops and keeps the runs that
finished (exit 130).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy: one BLAS thread, for reproducible timing

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

NAME = "fig5_finetune"
VOCAB, LENGTH = 8, 12
WIDTH, HEADS, LAYERS, MLP = 32, 4, 2, 64
RANK, ALPHA = 4, 4.0
BATCH = 32
DAMPING = 0.01
LR_ADAM = 1e-2
LR_TNGD = 0.1
EVAL = 256  # the loss and accuracy are measured on this many training and held-out sequences
T_TNGD = 10.0
COLUMNS = common.COLUMNS[:3] + ("t",) + common.COLUMNS[3:]


# -- the tasks ------------------------------------------------------------------------------------------


def sequences(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.integers(0, VOCAB, size=(n, LENGTH)), dtype=torch.int64)


def counts(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(x, VOCAB).sum(dim=1)  # (n, VOCAB)


def task_a(x: torch.Tensor) -> torch.Tensor:
    """Pre-training: the most frequent token (ties to the smallest), 8 classes."""
    return counts(x).argmax(dim=1)


def task_b(x: torch.Tensor) -> torch.Tensor:
    """Fine-tuning: token 1 more (0), as (1) or less (2) frequent than token 2, 3 classes."""
    c = counts(x)
    return 1 - torch.sign(c[:, 1] - c[:, 2]).long()


def finetune_data(quick: bool) -> common.Data:
    n_train, n_test = (2000, 1000) if not quick else (1000, 500)
    x_train, x_test = sequences(n_train, 101), sequences(n_test, 102)
    return common.Data(x_train, task_b(x_train), x_test, task_b(x_test))


# -- the model ------------------------------------------------------------------------------------------


class LoRALinear(torch.nn.Module):
    """y = x W^T + b + (alpha / r) x A^T B^T: a frozen linear layer plus a trainable rank-r update, B = 0 at
    the start so the adapted model begins as the pre-trained one (Hu et al. 2021)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T


class Block(torch.nn.Module):
    """Pre-norm encoder block: x + attention(LN x), then x + MLP(LN x); attention written out, so the model
    is a plain function of each sample under torch.func.vmap."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.query, self.key, self.value, self.output = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, MLP), torch.nn.GELU(), torch.nn.Linear(MLP, WIDTH))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        head = WIDTH // HEADS

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, n, HEADS, head).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)
        return self.output((weights @ v).transpose(1, 2).reshape(b, n, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(torch.nn.Module):
    """Token and position embeddings, LAYERS blocks, a final LayerNorm, mean pooling and a linear head."""

    def __init__(self, classes: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def pretrain(steps: int, seed: int = 0) -> tuple[Transformer, float]:
    """The base model trained with Adam on task A; returns it and its held-out accuracy on task A."""
    torch.manual_seed(seed)
    model = Transformer(VOCAB)
    x, x_test = sequences(4000, 201), sequences(1000, 202)
    y, y_test = task_a(x), task_a(x_test)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
    _, accuracy = common.cross_entropy_metrics(model, x_test, y_test)
    return model, accuracy


def adapted(base: Transformer, seed: int) -> Transformer:
    """A copy of the pre-trained model, frozen, with LoRA on every attention projection and a new 3-way
    head; only the adapters and the head are trainable."""
    torch.manual_seed(seed)
    model = Transformer(3)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in ("query", "key", "value", "output"):
            setattr(block, name, LoRALinear(getattr(block, name), RANK, ALPHA))
    model.head = torch.nn.Linear(WIDTH, 3)
    return model


def subset_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy on the first EVAL sequences of x (fixed subsets: the sets are already shuffled)."""
    return common.cross_entropy_metrics(model, x[:EVAL], y[:EVAL])


# -- the runs -------------------------------------------------------------------------------------------


def runs(base: Transformer, seeds: list[int], ts: list[float], lr: float = LR_ADAM) -> list[common.Run]:
    ce = torch.nn.functional.cross_entropy

    def adam(seed: int):
        model = adapted(base, seed)
        return model, common.adam(model, ce, lr)

    def tngd(seed: int):
        model = adapted(base, seed)
        return model, common.tngd(model, "cross_entropy", LR_TNGD, DAMPING, T_TNGD, seed)

    def tngd_adam(t: float, seed: int):
        model = adapted(base, seed)
        return model, common.tngd_adam(model, "cross_entropy", lr, DAMPING, t, seed)

    out = []
    for seed in seeds:
        out.append(common.Run("Adam", seed, lambda s=seed: adam(s), {"t": 0.0}))
        out.append(common.Run(f"TNGD t={T_TNGD:g}", seed, lambda s=seed: tngd(s), {"t": T_TNGD}))
        for t in ts:
            out.append(common.Run(f"TNGD-Adam t={t:g}", seed, lambda s=seed, t=t: tngd_adam(t, s), {"t": t}))
    return out


def plot(rows: list[dict], path: Path, ts: list[float], n: int, lr: float) -> None:
    plt = common.pyplot()
    from matplotlib import colormaps

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.6))
    for ax, y in zip(axes, ("train_loss", "test_accuracy"), strict=True):
        common.plot_band(ax, rows, "Adam", y, color="k", linestyle="--")
        common.plot_band(ax, rows, f"TNGD t={T_TNGD:g}", y, color="tab:gray", linestyle=":")
        for i, t in enumerate(ts):
            color = colormaps["viridis"](0.15 + 0.7 * i / max(1, len(ts) - 1))
            common.plot_band(ax, rows, f"TNGD-Adam t={t:g}", y, color=color)
        ax.set_xlabel(f"iteration (batches of {BATCH})")
        ax.grid(alpha=0.3)
    common.log_y(axes[0])
    axes[0].set_ylabel("training loss on task B (cross-entropy, nats)")
    axes[1].set_ylabel("held-out accuracy on task B (fraction)")
    fig.suptitle(
        f"LoRA fine-tuning of a pre-trained transformer (N = {n:,} trainable) on tngd-sim;"
        f" Adam, TNGD-Adam lr {lr:g}, TNGD lr {LR_TNGD:g}",
        fontsize=9,
    )
    common.save(fig, path, common.one_legend(fig, axes[0], ncol=5))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "paper_out")
    p.add_argument("--iters", type=int, default=None, help="fine-tuning iterations per run (default 80; --quick: 6)")
    p.add_argument("--t", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="TNGD-Adam analog times")
    p.add_argument("--lr", type=float, default=LR_ADAM, help="Adam's and TNGD-Adam's learning rate (default 1e-2)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="Adam steps on task A (default 300; --quick 100)")
    args = p.parse_args(argv)
    iters = args.iters or (6 if args.quick else 80)
    seeds = args.seeds or [0, 1, 2]
    out = Path(args.out)
    steps = args.pretrain_steps or (100 if args.quick else 300)
    n = common.n_parameters(adapted(Transformer(VOCAB), 0))
    plan: list[common.Run] = []
    if not args.replot:
        base, accuracy = pretrain(steps)
        print(f"pre-trained on task A: {steps} Adam steps, held-out accuracy {accuracy:.3f}; fine-tuning N = {n}")
        plan = runs(base, seeds, args.t, args.lr)
    rows, interrupted = common.execute(
        args,
        NAME,
        plan,
        lambda: finetune_data(args.quick),
        batch=BATCH,
        iters=iters,
        columns=COLUMNS,
        metrics=subset_metrics,
    )
    if rows:
        at = [i for i in (10, 50) if i < iters]
        print(common.summary_table(rows, "train_loss", at, extra=[("test acc @ last", "test_accuracy", "last")]))
        plot(rows, out / f"{NAME}.png", args.t, n, args.lr)
    return common.finish(rows, interrupted, out, NAME, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
