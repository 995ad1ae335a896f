"""MONAI, imported without the integrations it would load for nothing.

`import monai` imports every optional integration it finds installed (MLflow, TensorBoardX,
Optuna, matplotlib, scikit-learn: for its handlers, visualisation and auto3dseg apps). Here that
is about 3.5 s of CPU out of 7.5, paid by every Segmenter actor and segmentation training worker
at start-up, none of which uses them. `load()` imports MONAI with those hidden; MONAI keeps its
own placeholders for them, and anything imported later in the process sees them as usual.
"""

from __future__ import annotations

import sys

HIDDEN = ("mlflow", "tensorboardX", "optuna", "matplotlib", "sklearn")


def load() -> None:
    """Import MONAI (once per process) with HIDDEN invisible to it; call before any
    `from monai... import`."""
    if "monai" in sys.modules:
        return
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError: MONAI's optional_import
    try:
        import monai  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
