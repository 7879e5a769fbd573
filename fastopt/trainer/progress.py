"""The Trainer's progress bar (tqdm, when installed and stderr is a terminal)."""

import sys
import warnings


def bar_factory(progress, total_epochs, epoch_of):
    """A function ``n -> tqdm bar over n samples`` for one epoch, or None for no bar.

    ``progress``: True (warn if tqdm is missing), False, or None (a bar only when tqdm is
    installed and stderr is a terminal); ``epoch_of()`` gives the epochs completed so far."""
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            warnings.warn(
                "progress=True needs tqdm (pip install tqdm); training without a progress bar",
                stacklevel=3,
            )
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None

    def make(n):
        return tqdm(
            total=n,
            desc=f"epoch {epoch_of() + 1}/{total_epochs}",
            unit="sample",
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
        )

    return make
