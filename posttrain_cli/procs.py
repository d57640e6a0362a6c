"""Set-up of the processes posttrain starts, shared by the launchers and the stage worker.

It imports nothing of posttrain: the launchers and the worker both sit above it, so the worker
needs no launcher to guard its ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies. torchrun and its ranks run in sessions
    of their own; without this a killed `posttrain run` would leave them training. SIGTERM, not
    SIGKILL: the ranks save a checkpoint at the next step and stop (engine/checkpoint.py)."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _libc():
    """Loaded before any fork: a preexec_fn must not import."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, accelerator notices) off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def compilers(cuda: bool) -> list[str]:
    """Where torch.compile's Inductor looks for its compiler: Triton's C compiler on GPUs ($CC, else
    cc, gcc, clang), the C++ compiler on CPU (torch._inductor.config.cpp.cxx: $CXX, else g++;
    clang++ on macOS)."""
    if cuda:
        return [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return [os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")]


def compiler_for(*, cuda: bool) -> str | None:
    """The compiler torch.compile would build with (found without importing torch), or None."""
    return next((found for name in compilers(cuda) if (found := shutil.which(name))), None)


def liger_problem(*, cuda: bool) -> str | None:
    """Why Liger's kernels (deepspeed.kernels=liger) cannot run here, found without importing them,
    or None. Triton's interpreter (TRITON_INTERPRET=1) runs them without a GPU, slowly."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'posttrain[liger]')"
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Liger's kernels are Triton's and need a CUDA GPU; there is none here (TRITON_INTERPRET=1 runs "
                "them in Triton's interpreter, slowly, to check them)")
    return None
