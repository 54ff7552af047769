"""Per-iteration cost of TNGD in PyTorch (driver.optim) on the paper's MNIST CNN shape, against Adam and an anchor.

    pip install ".[torch,examples,bench]"       # bench: posteriors, the anchor
    python benchmarks/bench_torch_step.py [--repeats 7] [--batch 64]

Model and data: examples/tngd_torch.py's DigitsCNN (one convolution, two fully connected layers, N = 2,530,
float32) on scikit-learn's 8 x 8 digits, batch 64, so m = 640 GGN rows.  One process, one BLAS and one torch
thread.  Rows (median wall time per iteration over --repeats after one warm-up):

    Adam step                 forward, backward, torch.optim.Adam.step
    ggn()                     driver.optim.ggn: loss, g, J (640 x 2530) and H by torch.func, per sample
    anchor: jacrev (batch)    J as posteriors builds it: torch.func.jacrev of the whole batch's outputs in
                              the flat parameters, then H by jacfwd(jacrev(loss)) (posteriors.utils)
    anchor: posteriors.ggn    the same plus the dense F = J^T H J (N x N), posteriors' public function
    TNGD exact / woodbury / cg / device
                              driver.optim.TNGD.step, solver as named (includes ggn()); device = tngd-sim at
                              t = 10 after a first step that sets the device state; its hardware-time
                              estimate (16-bit codes over 50 Gb/s, tau = 1 us) is printed beside it

Targets (issue 10): ggn() within 1.2x of the anchor's Jacobian time; the device step within 1.5x of the
woodbury step.  Both are printed as ratios measured in this run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import driver  # noqa: E402
from driver.optim import TNGD, ggn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tngd_torch import load_digits_tensors, make_model  # noqa: E402

DAMPING = 0.01


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: numba and torch compile or cache on first use
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def anchors(model, inputs, targets):
    """(J and H the posteriors way, posteriors.ggn's F), or None where posteriors is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import posteriors
            from optree.integrations.torch import tree_ravel
            from posteriors.utils import _hess_and_jac_for_ggn
    except ImportError:
        return None
    params = {name: p.detach() for name, p in model.named_parameters()}

    def forward(p):
        return torch.func.functional_call(model, p, (inputs,))

    def loss(z):
        return torch.nn.functional.cross_entropy(z, targets)

    flat, unravel = tree_ravel(params)

    def jacobian():
        return _hess_and_jac_for_ggn(lambda f: forward(unravel(f)), loss, 0, False, False, False, flat)

    def full():
        return posteriors.ggn(forward, loss)(params)

    return jacobian, full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--t", type=float, default=10.0, help="TNGD analog time per step (default 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    X, y = load_digits_tensors()
    inputs, targets = X[: args.batch], y[: args.batch]
    model = make_model(0)
    n = sum(p.numel() for p in model.parameters())
    m = args.batch * 10
    print(f"DigitsCNN: N = {n} parameters, batch {args.batch}, m = {m}; 1 thread; median of {args.repeats}")

    rows: list[tuple[str, float, str]] = []

    adam_model = make_model(0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        torch.nn.functional.cross_entropy(adam_model(inputs), targets).backward()
        adam.step()

    rows.append(("Adam step", median_time(adam_step, args.repeats), ""))
    t_ggn = median_time(lambda: ggn(model, "cross_entropy", inputs, targets), args.repeats)
    rows.append(("ggn()", t_ggn, ""))
    anchor = anchors(model, inputs, targets)
    t_anchor = None
    if anchor is not None:
        t_anchor = median_time(anchor[0], args.repeats)
        rows.append(("anchor: jacrev (batch)", t_anchor, "posteriors' J and H"))
        rows.append(("anchor: posteriors.ggn", median_time(anchor[1], max(1, args.repeats // 2)), "J, H and F"))
    else:
        rows.append(("anchor", float("nan"), "posteriors not installed: pip install '.[bench]'"))

    steps = {}
    for solver in ("exact", "woodbury", "cg"):
        opt = TNGD(make_model(0), "cross_entropy", solver=solver, lr=1e-3, damping=DAMPING)
        steps[solver] = median_time(lambda opt=opt: opt.step(inputs, targets), args.repeats)
        rows.append((f"TNGD {solver}", steps[solver], ""))
    with driver.open("tngd-sim", seed=0) as dev:
        opt = TNGD(make_model(0), "cross_entropy", dev, lr=1e-3, damping=DAMPING, t=args.t)
        steps["device"] = median_time(lambda: opt.step(inputs, targets), args.repeats)
        hardware = statistics.median(r.hardware_time_s for r in opt.records[1:])
        device_tau = statistics.median(r.device_time for r in opt.records[1:])
    rows.append(("TNGD device (tngd-sim)", steps["device"], f"hardware estimate {hardware * 1e6:.0f} us"))
    rows.append(("", float("nan"), f"(device run {device_tau:.1f} tau per step)"))

    adam_time = rows[0][1]
    print(f"\n{'per iteration':<26}{'wall ms':>10}{'x Adam':>9}  note")
    for name, seconds, note in rows:
        if name:
            print(f"{name:<26}{seconds * 1e3:>10.2f}{seconds / adam_time:>9.1f}  {note}")
        else:
            print(f"{'':<45}  {note}")
    print("\ntargets")
    if t_anchor is not None:
        print(f"  ggn() / anchor's J time        {t_ggn / t_anchor:6.2f}   (target <= 1.2)")
    print(f"  device step / woodbury step    {steps['device'] / steps['woodbury']:6.2f}   (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
