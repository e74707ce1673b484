"""What one training step of each loss costs a GPU, counted on CPU: dispatched ops (each a kernel launch on
CUDA) and host syncs, per forward + backward.

    [TRITON_INTERPRET=1] python benchmarks/step_costs.py [--sizes 64 256 1024]

Counted on the code path CUDA takes (``METRICLOSS_NATIVE=0``, value checks as device-side assertions; the
triplet family on its torch backend, so batch-hard's Triton miner is not in the count): every aten op that reaches the dispatcher except views and
empty allocations (:class:`OpCounter`), and the calls that make a GPU wait for the host
(:func:`benchmarks.gpu_check.make_sync_counter`: ``item``, ``nonzero``, boolean-mask indexing, …). The
counts are exact and do not depend on the machine, so ``tests/test_step_costs.py`` holds every loss to a
budget. The workloads: D = 128 embeddings, P×K labels with K = 4, ``num_classes`` = N/4 for the classifier
losses, (N, 1000) scores for WARP, fp32, the default memory budget (one chunk). With
``TRITON_INTERPRET=1`` (and Triton installed) the table gains sampled WARP on its Triton kernel, each
launch counted as one op.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from typing import Callable, Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import make_sync_counter  # noqa: E402

# not launches: views and allocations without a kernel
_NOT_LAUNCHES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
                 "alias", "_reshape_alias", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, views and empty allocations excepted; ``by_op`` per name."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NOT_LAUNCHES):
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """A Triton kernel whose launches count as one op each; the launch runs with the dispatch modes off, so
    the interpreter's own tensor copies (it runs the kernel on CPU tensors) are not counted as launches."""

    def __init__(self, kernel, counter: "OpCounter"):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes

            self.counter.by_op[f"triton:{getattr(self.kernel, '__name__', 'kernel')}"] += 1
            with _disable_current_modes():
                return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def _kernel_launches_counted(counter: "OpCounter"):
    """Within it, every launch of metricloss's WARP and batch-hard mining kernels adds one to ``counter`` (see
    :class:`_CountedKernel`)."""
    try:
        from metricloss.kernels import mining as mining_kernels
        from metricloss.kernels import warp as warp_kernels
    except ImportError:  # no Triton: nothing to count
        yield
        return
    kernels = [(warp_kernels, "warp_sample_kernel"), (warp_kernels, "warp_grad_kernel"),
               (mining_kernels, "batch_hard_mining_kernel")]
    saved = [getattr(module, name) for module, name in kernels]
    for (module, name), kernel in zip(kernels, saved):
        setattr(module, name, _CountedKernel(kernel, counter))
    try:
        yield
    finally:
        for (module, name), kernel in zip(kernels, saved):
            setattr(module, name, kernel)


def triton_rows_available() -> bool:
    """Whether the Triton rows can be counted here: Triton imports and its interpreter is on
    (``TRITON_INTERPRET=1`` before anything imports triton; the test suite sets it)."""
    from metricloss._backend import triton_available, triton_interpreting

    return triton_available() and triton_interpreting()


def count_step(step: Callable[[], torch.Tensor]) -> Tuple[int, int]:
    """(dispatched ops, host syncs) of ``step().backward()`` on the CUDA code path: ``METRICLOSS_NATIVE=0``
    (the torch path) and :func:`metricloss._checks.accelerator_rules` (value checks as device-side
    assertions, first-call checks done once), after one warm-up step (one-time work is not per step). A
    Triton kernel run under the interpreter counts as one op per launch."""
    from metricloss._checks import accelerator_rules

    saved = os.environ.get("METRICLOSS_NATIVE")
    os.environ["METRICLOSS_NATIVE"] = "0"
    try:
        with accelerator_rules():
            step().backward()
            ops = OpCounter()
            with _kernel_launches_counted(ops), make_sync_counter() as syncs, ops:
                step().backward()
        return ops.total, syncs.total
    finally:
        if saved is None:
            del os.environ["METRICLOSS_NATIVE"]
        else:
            os.environ["METRICLOSS_NATIVE"] = saved


def workloads(n: int) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a fresh training step's loss (inputs that require grad), for batch size ``n``."""
    import metricloss as ml
    import metricloss.functional as MF

    g = torch.Generator().manual_seed(n)
    d, classes = 128, max(2, n // 4)
    x0 = torch.randn(n, d, generator=g)
    labels = torch.arange(n) // 4
    scores0 = torch.randn(n, 1000, generator=g)
    score_labels = torch.randint(0, 1000, (n,), generator=g)
    cosine = ml.CosineClassifier(d, classes)
    norm_softmax = ml.NormSoftmaxLoss(d, classes)
    norm_softmax_streamed = ml.NormSoftmaxLoss(d, classes, class_chunk=max(1, classes // 4))
    memory = ml.CrossBatchMemory(ml.TripletLoss(mining="batch_hard"), d, memory_size=2 * n)
    dgcrl = ml.CentralizedRankingLoss(d, classes)
    centroid = ml.CentroidTripletLoss(num_classes=classes, embedding_dim=d, centroids="kmeans")
    two_head = ml.TwoHeadLoss(triplet="semi_hard")
    classifier = torch.nn.Linear(d, classes)
    svmax = ml.SVMaxRegularizer(weight=0.1)
    sct, ephn = ml.SCTLoss(), ml.EPHNLoss()  # modules with their collapse monitors on (no cost between checks)

    def leaf(t):
        return t.clone().requires_grad_(True)

    out = {
        "batch-hard": lambda: MF.triplet_loss(leaf(x0), labels, mining="batch_hard", backend="torch"),
        "SCT (module, monitor on)": lambda: sct(leaf(x0), labels),
        "EPHN (module, monitor on)": lambda: ephn(leaf(x0), labels),
        "batch-all (mean_nonzero)": lambda: MF.triplet_loss(leaf(x0), labels, mining="batch_all",
                                                            reduction="mean_nonzero"),
        "semi-hard": lambda: MF.triplet_loss(leaf(x0), labels, mining="semi_hard"),
        "batch-hard, CrossBatchMemory (memory 2N)": lambda: memory(leaf(x0), labels),
        "NormSoftmax": lambda: norm_softmax(leaf(x0), labels),
        "NormSoftmax streamed (4 class chunks)": lambda: norm_softmax_streamed(leaf(x0), labels),
        "cosine classifier + cross-entropy": lambda: torch.nn.functional.cross_entropy(cosine(leaf(x0)), labels),
        "centroid bound": lambda: centroid(leaf(x0), labels),
        "DGCRL": lambda: dgcrl(leaf(x0), labels),
        "SVMax": lambda: svmax(leaf(x0)),
        "two-head (CE + semi-hard)": lambda: _two_head(two_head, classifier, leaf(x0), labels),
        "WARP sampled, (N, 1000)": lambda: MF.warp_loss(leaf(scores0), score_labels, mode="sampled",
                                                        generator=torch.Generator().manual_seed(0)),
        "WARP exact, (N, 1000)": lambda: MF.warp_loss(leaf(scores0), score_labels, mode="exact"),
        "cross-entropy, (N, 1000) (for scale)": lambda: torch.nn.functional.cross_entropy(leaf(scores0),
                                                                                         score_labels),
    }
    if triton_rows_available():
        out["WARP sampled, Triton kernel, (N, 1000)"] = lambda: MF.warp_loss(leaf(scores0), score_labels,
                                                                           backend="triton")
        out["batch-hard, Triton miner"] = lambda: MF.triplet_loss(leaf(x0), labels, mining="batch_hard",
                                                                  backend="triton")
    return out


def _two_head(loss, classifier, x, labels):
    return loss(classifier(x), x, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args()
    print(f"torch {torch.__version__}; dispatched ops / host syncs per forward + backward (CUDA code path)")
    table = {n: {name: count_step(step) for name, step in workloads(n).items()} for n in args.sizes}
    names = list(table[args.sizes[0]])
    print("| loss | " + " | ".join(f"N = {n}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{table[n][name][0]} / {table[n][name][1]}" for n in args.sizes) + " |")


if __name__ == "__main__":
    main()
