"""Fine-tuning LoRA adapters from a DSPy program's traces, and using them (``lm.finetune``,
``dspy.BootstrapFinetune``).

    LocalLoRAProvider      trains with PEFT on this machine, serves through a local llama-server
                           (extra ``[finetune]`` in the interpreter that trains)
    AnyscaleJobsProvider   submits a LLaMA-Factory LoRA job to Anyscale Jobs and serves it from a Ray
                           Serve LLM service's ``dynamic_lora_loading_path`` (extra ``[anyscale]``)

Both load on first use: importing this package imports neither torch nor the Anyscale SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import AdapterProvider, AdapterTrainingJob, check_chat_data

if TYPE_CHECKING:
    from ._anyscale_jobs import AnyscaleJobsProvider
    from ._local import LocalLoRAProvider

_LAZY = {"LocalLoRAProvider": "._local", "AnyscaleJobsProvider": "._anyscale_jobs"}

__all__ = ["AdapterProvider", "AdapterTrainingJob", "AnyscaleJobsProvider", "LocalLoRAProvider", "check_chat_data"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
