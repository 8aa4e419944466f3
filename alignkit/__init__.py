"""alignkit: post-training for causal language models, as a library, a command line and a console.

    import alignkit

    run = alignkit.train("configs/sft_tiny.yaml", max_steps=20, output_dir="out/sft")
    report = alignkit.evaluate(model=run.output_dir, dataset="data/test.jsonl")

The functions (`train`, `evaluate`, `compare`, `export`, `serve`, `chat`, `inspect`, `sample`,
`from_feedback`, `from_votes`) live in `alignkit.api`; they are imported on first use, so `import alignkit` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.errors import UserError

__version__ = "0.1.0"

# name -> the module that defines it (loaded when the name is first used)
_LAZY = {
    "train": "alignkit.api",
    "evaluate": "alignkit.api",
    "compare": "alignkit.api",
    "export": "alignkit.api",
    "merge": "alignkit.api",
    "serve": "alignkit.api",
    "chat": "alignkit.api",
    "inspect": "alignkit.api",
    "sample": "alignkit.api",
    "from_feedback": "alignkit.api",
    "from_votes": "alignkit.api",
    "sxs": "alignkit.api",
    "tiny": "alignkit.api",
    "TrainResult": "alignkit.api",
    "EvalResult": "alignkit.api",
    "CompareResult": "alignkit.api",
    "ChatReply": "alignkit.api",
    "TrainEvent": "alignkit.training.events",
    "ExportResult": "alignkit.ship.export.card",
    "GGUFExport": "alignkit.ship.export.gguf_out",
    "MergeResult": "alignkit.ship.merging",
}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
