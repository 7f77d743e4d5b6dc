"""Residual Sparse Training (RST) as a PEFT method.

`import peft_rst` registers the method with peft, after which `get_peft_model(model, RSTConfig(...))`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModel*.from_pretrained` handle RST adapters.
"""

from ._registration import IncompatiblePeftError, register_rst

register_rst()

from .config import RSTConfig, RSTPeftType  # noqa: E402
from .hotswap import HotswapError, hotswap_adapter  # noqa: E402
from .hub import HubTokenError, push_adapter_to_hub  # noqa: E402
from .layer import RSTLayer  # noqa: E402
from .model import BaseWeightsMismatchError, RSTModel  # noqa: E402
from .model_card import render_model_card, write_model_card  # noqa: E402
from .report import AdapterReport, DSPReport, ModuleRow, report  # noqa: E402
from .resume import restore_reset_step  # noqa: E402
from .transformers_integration import load_rst_adapter  # noqa: E402

__all__ = [
    "AdapterReport",
    "BaseWeightsMismatchError",
    "DSPReport",
    "HotswapError",
    "HubTokenError",
    "ModuleRow",
    "IncompatiblePeftError",
    "RSTConfig",
    "RSTLayer",
    "RSTModel",
    "RSTPeftType",
    "hotswap_adapter",
    "load_rst_adapter",
    "push_adapter_to_hub",
    "render_model_card",
    "report",
    "restore_reset_step",
    "write_model_card",
]
__version__ = "0.1.0"
