"""gradwatch: find, explain and fix vanishing and exploding gradients in PyTorch.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> import gradwatch
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradwatch.watch(model, opt, run=tempfile.mkdtemp()) as w:
    ...     for _ in range(3):
    ...         loss = model(torch.randn(16, 8)).pow(2).mean()
    ...         opt.zero_grad(); loss.backward(); opt.step()
    >>> gradwatch.open_run(w.run_dir).steps.tolist()
    [0, 1, 2]
"""

__version__ = "0.1.0"

from .diagnose import Finding, Remedy, Report, diagnose  # noqa: E402
from .probes.numerics import NonFiniteError  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .store import Run, RunExistsError, RunStoreError, open_run  # noqa: E402
from .watch import Watcher, watch  # noqa: E402

__all__ = [
    "Finding",
    "NonFiniteError",
    "Remedy",
    "Report",
    "Run",
    "RunExistsError",
    "RunStoreError",
    "Schedule",
    "Watcher",
    "__version__",
    "diagnose",
    "open_run",
    "watch",
]
